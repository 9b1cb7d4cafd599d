{{/* Names and labels shared by every template. */}}
{{- define "chat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chat.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "chat.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "chat.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "chat.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "chat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include "chat.selector" (list . "chat") */}}
{{- define "chat.selector" -}}
app.kubernetes.io/name: {{ include "chat.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "chat.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "chat.secretName" -}}
{{- default (printf "%s-secrets" (include "chat.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "chat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ default (include "chat.fullname" .) .Values.serviceAccount.name }}{{ else }}{{ default "default" .Values.serviceAccount.name }}{{ end }}
{{- end }}

{{- define "chat.redisName" -}}
{{- printf "%s-redis" (include "chat.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Redis Cluster startup nodes, as a list of host:port. */}}
{{- define "chat.redisNodes" -}}
{{- if .Values.redis.builtIn }}
{{- $name := include "chat.redisName" . }}
{{- range $i := until 6 }}{{ if $i }},{{ end }}{{ $name }}-{{ $i }}.{{ $name }}-headless:6379{{ end }}
{{- else }}
{{- required "redis.externalNodes must list host:port startup nodes when redis.builtIn is false" (join "," .Values.redis.externalNodes) }}
{{- end }}
{{- end }}

{{/* Host and Origin names the chat accepts: in-cluster Service names, routes, ingress, extras. */}}
{{- define "chat.allowedHosts" -}}
{{- $svc := include "chat.fullname" . }}
{{- $hosts := list "localhost" $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) }}
{{- if .Values.httpRoute.enabled }}{{ $hosts = concat $hosts .Values.httpRoute.hostnames }}{{ end }}
{{- if .Values.ingress.enabled }}{{ range .Values.ingress.hosts }}{{ $hosts = append $hosts . }}{{ end }}{{ end }}
{{- join "," (uniq (concat $hosts .Values.chat.allowedHosts)) }}
{{- end }}

{{/* Container security of every pod of the chart that runs our images. */}}
{{- define "chat.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{- define "chat.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
fsGroup: {{ .Values.security.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}
