-- The job records of a Redis queue (redis_queue.py): every state change of a job is one call of this
-- script, so it is atomic. dramatiq delivers the jobs' messages; these records say what became of them.
--
-- jobs(keys=[prefix], args=[command, now, job id, ...])
--
-- $prefix:job:$id         hash: id seq state request created started finished attempts cancel_requested
--                         error owner (the token of the attempt that runs it) delivered (that token, once
--                         its images were handed in) deliveries (how many were accepted: 0 or 1) last
--                         (the last change an attempt made: "<token> <command>")
-- $prefix:jobs            zset: every job by submission order (seq)
-- $prefix:q:$state        zset per state: queued, running, done, failed, cancelled (queued: by queue ticket)
-- $prefix:seq, :ticket    counters: submission order; queue order (a released job gets a new ticket)
-- $prefix:version         counter: bumped on every state change (followers re-read jobs after one)
-- $prefix:progress:$id    hash: step total version pv (preview version) preview (PNG bytes)
-- $prefix:result:$id      hash: n, png:$i, manifest:$i: the images a worker handed in
-- $prefix:results         list: ids whose images wait for the API node's gallery (it moves each to
--                         :collecting while it writes the files, so a crash there loses nothing)
-- $prefix:stats           hash: delivered, rejected (hand-ins of attempts that no longer owned the job)

local P = KEYS[1]
local command, now, id = ARGV[1], ARGV[2], ARGV[3]
local job = P .. ":job:" .. id

local function set_state(new, score)
    local old = redis.call("hget", job, "state")
    redis.call("zrem", P .. ":q:" .. old, id)
    redis.call("zadd", P .. ":q:" .. new, score or redis.call("hget", job, "seq"), id)
    redis.call("hset", job, "state", new)
    if new == "done" or new == "failed" or new == "cancelled" then
        redis.call("hset", job, "finished", now)
        redis.call("del", P .. ":progress:" .. id)
    end
    redis.call("incr", P .. ":version")
end

-- the caller's attempt is the one running the job (a worker taken for dead and replaced is not)
local function owns(token)
    return redis.call("hget", job, "state") == "running" and redis.call("hget", job, "owner") == token
end

-- A call whose answer was lost (the server restarted after running it) is retried by the client: an
-- attempt's last change is remembered, so that running it again answers as the first time did.
local function repeated(token)
    return redis.call("hget", job, "last") == token .. " " .. command
end

local function remember(token)
    redis.call("hset", job, "last", token .. " " .. command)
    return 1
end

if command == "submit" then  -- request (JSON)
    if redis.call("exists", job) == 1 then
        return 0  -- a retried call
    end
    local seq = redis.call("incr", P .. ":seq")
    redis.call("hset", job, "id", id, "seq", seq, "state", "queued", "request", ARGV[4], "created", now,
               "attempts", 0, "cancel_requested", 0, "deliveries", 0)
    redis.call("zadd", P .. ":jobs", seq, id)
    redis.call("zadd", P .. ":q:queued", redis.call("incr", P .. ":ticket"), id)
    redis.call("incr", P .. ":version")
    return 1

elseif command == "claim" then  -- token, max_attempts -> "claimed", "ended" (nothing to run) or "missing"
    local state = redis.call("hget", job, "state")
    if not state then
        return "missing"
    end
    if redis.call("hget", job, "owner") == ARGV[4] and state == "running" then
        return "claimed"  -- a retried call
    end
    if state == "running" and redis.call("hexists", job, "delivered") == 0 then
        -- dramatiq delivered the job's message again: the worker running it stopped heartbeating
        if redis.call("hget", job, "cancel_requested") == "1" then
            set_state("cancelled")
            return "ended"
        end
        local attempts = tonumber(redis.call("hget", job, "attempts"))
        if attempts >= tonumber(ARGV[5]) then
            redis.call("hset", job, "error",
                       "gave up after " .. attempts .. " attempts: the worker stopped while running this job each time")
            set_state("failed")
            return "ended"
        end
        redis.call("incr", P .. ":version")
    elseif state == "queued" then
        set_state("running")
    else
        return "ended"  -- finished, or its images are handed in already
    end
    redis.call("hset", job, "owner", ARGV[4], "started", now)
    redis.call("hincrby", job, "attempts", 1)
    redis.call("del", P .. ":progress:" .. id)
    return "claimed"

elseif command == "progress" then  -- token, step, total[, preview]
    if not owns(ARGV[4]) then
        return 0
    end
    local key = P .. ":progress:" .. id
    redis.call("hset", key, "step", ARGV[5], "total", ARGV[6])
    if ARGV[7] then
        redis.call("hset", key, "preview", ARGV[7])
        redis.call("hincrby", key, "pv", 1)
    end
    redis.call("hincrby", key, "version", 1)
    return 1

elseif command == "deliver" then  -- token, then a PNG and its manifest (JSON) per image
    if redis.call("hget", job, "delivered") == ARGV[4] then
        return 1  -- a retried call (the job may have ended since)
    end
    if not owns(ARGV[4]) then
        redis.call("hincrby", P .. ":stats", "rejected", 1)
        return 0
    end
    local result = P .. ":result:" .. id
    redis.call("del", result)
    local n = 0
    for i = 5, #ARGV, 2 do
        redis.call("hset", result, "png:" .. n, ARGV[i], "manifest:" .. n, ARGV[i + 1])
        n = n + 1
    end
    redis.call("hset", result, "n", n)
    redis.call("hset", job, "delivered", ARGV[4])
    redis.call("hincrby", job, "deliveries", 1)
    redis.call("hincrby", P .. ":stats", "delivered", 1)
    redis.call("rpush", P .. ":results", id)
    return 1

elseif command == "collected" then  -- [error]: the API node wrote the images into its gallery (or could not)
    if redis.call("hget", job, "state") == "running" and redis.call("hexists", job, "delivered") == 1 then
        if ARGV[4] then
            redis.call("hset", job, "error", ARGV[4])
            set_state("failed")
        else
            set_state("done")
        end
    end
    redis.call("del", P .. ":result:" .. id)
    redis.call("lrem", P .. ":collecting", 0, id)
    return 1

elseif command == "fail" or command == "cancelled" or command == "release" then  -- token[, error]
    local token = ARGV[4]
    if repeated(token) then
        return 1
    end
    if not owns(token) then
        return 0
    end
    if command == "fail" then
        redis.call("hset", job, "error", ARGV[5])
        set_state("failed")
    elseif command == "cancelled" then  -- the worker stopped at a step after cancellation was asked
        set_state("cancelled")
    else  -- the worker is stopping: the job goes back to the queue, the attempt not counted
        set_state("queued", redis.call("incr", P .. ":ticket"))
        redis.call("hincrby", job, "attempts", -1)
        redis.call("hdel", job, "owner", "started")
        redis.call("del", P .. ":progress:" .. id)
    end
    return remember(token)

elseif command == "cancel" then  -- -> the state it was in (false: no such job)
    local state = redis.call("hget", job, "state")
    if state == "queued" then
        redis.call("hset", job, "cancel_requested", 1)
        set_state("cancelled")
    elseif state == "running" then
        redis.call("hset", job, "cancel_requested", 1)
        redis.call("incr", P .. ":version")
    end
    return state
end
return redis.error_reply("unknown command " .. tostring(command))
