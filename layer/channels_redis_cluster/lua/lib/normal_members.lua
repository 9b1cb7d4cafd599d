-- A group's normal channels that joined after ``cutoff``: every group_send pushes to their queues, since
-- normal channels live in Redis, not in any one process; older ones are dropped.

local function normal_members(queues, cutoff)
  redis.call('ZREMRANGEBYSCORE', queues, '-inf', '(' .. cutoff)
  return redis.call('ZRANGE', queues, 0, -1)
end
