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

{{/* A memory quantity (Mi, Gi, mb, gb) in MiB, for the chart's own sizing checks. */}}
{{- define "chat.mebibytes" -}}
{{- $q := lower (toString .) }}
{{- if hasSuffix "gi" $q }}{{ mul (trimSuffix "gi" $q | int) 1024 }}
{{- else if hasSuffix "gb" $q }}{{ mul (trimSuffix "gb" $q | int) 1024 }}
{{- else if hasSuffix "mi" $q }}{{ trimSuffix "mi" $q | int }}
{{- else if hasSuffix "mb" $q }}{{ trimSuffix "mb" $q | int }}
{{- else }}{{ fail (printf "memory quantity %q: use Mi, Gi, mb or gb" $q) }}{{ end }}
{{- end }}

{{/* A CPU quantity ("500m", "1", "1.5") in millicores. */}}
{{- define "chat.millicores" -}}
{{- $q := toString . }}
{{- if hasSuffix "m" $q }}{{ trimSuffix "m" $q | int }}{{ else }}{{ mulf (float64 $q) 1000 | int }}{{ end }}
{{- end }}

{{/* DNS egress, for every pod of the chart in a default-deny namespace. */}}
{{- define "chat.dnsEgress" -}}
- to:
    - namespaceSelector: {}
      podSelector:
        matchLabels: {{- toYaml .Values.networkPolicy.dnsPodLabels | nindent 10 }}
  ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- end }}

{{/*
The made Secret's data: given values, else the Secret of an earlier install (lookup), else generated.
Computed once per render, so the pods' checksum/secret annotation hashes what the Secret holds.
Without a cluster to look in (helm template, --dry-run, Argo CD) a generated value would change on every
render: that fails with a pointer to existingSecret instead.
*/}}
{{- define "chat.secretData" -}}
{{- if not (hasKey .Values.secrets "rendered") }}
{{- $given := dict "DJANGO_SECRET_KEY" .Values.secrets.djangoSecretKey "REDIS_PASSWORD" .Values.secrets.redisPassword }}
{{- $previous := (lookup "v1" "Secret" .Release.Namespace (include "chat.secretName" .)).data | default dict }}
{{- $tokenGiven := or (eq .Values.chat.identity "off") .Values.secrets.chatTokenSecret }}
{{- if and (not (and $given.DJANGO_SECRET_KEY $given.REDIS_PASSWORD $tokenGiven)) (not $previous) (not (lookup "v1" "Namespace" "" "kube-system")) }}
{{- fail "secrets: this render cannot reach a cluster (helm template, --dry-run, Argo CD), so generated secrets would change on every render. Set secrets.existingSecret to a Secret you manage (the GitOps way), or give secrets.djangoSecretKey and secrets.redisPassword (and secrets.chatTokenSecret with chat.identity on)" }}
{{- end }}
{{- $data := dict }}
{{- $_ := set $data "DJANGO_SECRET_KEY" ($given.DJANGO_SECRET_KEY | b64enc | default (get $previous "DJANGO_SECRET_KEY") | default (randAlphaNum 50 | b64enc)) }}
{{- $_ := set $data "REDIS_PASSWORD" ($given.REDIS_PASSWORD | b64enc | default (get $previous "REDIS_PASSWORD") | default (randAlphaNum 32 | b64enc)) }}
{{- if ne .Values.chat.identity "off" }}
{{- $_ := set $data "CHAT_TOKEN_SECRET" (.Values.secrets.chatTokenSecret | b64enc | default (get $previous "CHAT_TOKEN_SECRET") | default (randAlphaNum 48 | b64enc)) }}
{{- end }}
{{- $_ := set .Values.secrets "rendered" $data }}
{{- end }}
{{- toYaml .Values.secrets.rendered }}
{{- end }}

{{/* The Secret with the built-in nodes' TLS files; "" when TLS is off or Redis is external. */}}
{{- define "chat.redisTlsSecret" -}}
{{- if and .Values.redis.builtIn .Values.redis.tls.enabled }}
{{- .Values.redis.tls.existingSecret | default (printf "%s-tls" (include "chat.redisName" .)) }}
{{- end }}
{{- end }}

{{/* A CA and the nodes' certificate, made once and found again on upgrades (like the passwords). */}}
{{- define "chat.redisTlsData" -}}
{{- $name := include "chat.redisName" . }}
{{- $previous := (lookup "v1" "Secret" .Release.Namespace (include "chat.redisTlsSecret" .)).data | default dict }}
{{- if $previous }}
{{- toYaml $previous }}
{{- else }}
{{- if not (lookup "v1" "Namespace" "" "kube-system") }}
{{- fail "redis.tls: this render cannot reach a cluster (helm template, --dry-run, Argo CD), so a generated CA would change on every render. Set redis.tls.existingSecret to a kubernetes.io/tls Secret with ca.crt that you manage (cert-manager), or redis.tls.enabled=false" }}
{{- end }}
{{- $ca := genCA (printf "%s CA" $name) 3650 }}
{{- $hosts := list (printf "*.%s-headless" $name) (printf "*.%s-headless.%s.svc" $name .Release.Namespace) (printf "*.%s-headless.%s.svc.cluster.local" $name .Release.Namespace) "localhost" }}
{{- $cert := genSignedCert $name nil $hosts 3650 $ca }}
ca.crt: {{ $ca.Cert | b64enc }}
tls.crt: {{ $cert.Cert | b64enc }}
tls.key: {{ $cert.Key | b64enc }}
{{- end }}
{{- end }}

{{/* Rolls pods when the Secret the chart makes changes; an existingSecret is yours to roll. */}}
{{- define "chat.secretChecksum" -}}
{{- if .Values.secrets.existingSecret }}{{ .Values.secrets.existingSecret | sha256sum }}{{ else }}{{ include "chat.secretData" . | sha256sum }}{{ end }}
{{- end }}
