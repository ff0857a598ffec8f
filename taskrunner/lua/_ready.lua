-- The "ready" event of a job written into a drained partition: it names the job, so the
-- worker it wakes claims that job in its read (take.lua); a bare "ready" for an id longer
-- than @READY_NAME_LIMIT@ bytes (which the worker would not use: a message goes to every
-- subscribed worker). Prepended to the scripts that use ready_event (taskrunner/scripts.py).
local function ready_event(job_id)
  if #job_id > @READY_NAME_LIMIT@ then
    return 'ready'
  end
  return 'ready ' .. job_id
end

