-- Argo CD health check for finetune.dev/FineTuneJob (resource.customizations, key
-- "finetune.dev/FineTuneJob"). Argo CD runs it with gopher-lua (Lua 5.1): `obj` is the resource.
--   Progressing  while Pending or Running, or while the status is older than the spec
--   Degraded     while Pending or Running with a refused spec change (InvalidSpec)
--   Healthy      when Succeeded
--   Degraded     when Failed
--   Suspended    when suspended (spec.suspend or phase Suspended)
local hs = {}
local function condition(status, type_)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end
local function message(status, type_, fallback)
  local c = condition(status, type_)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local status = obj.status
local suspend = obj.spec ~= nil and obj.spec.suspend == true
if status == nil or status.phase == nil then
  if suspend then
    hs.status = "Suspended"
    hs.message = "Suspended before it started"
    return hs
  end
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end
local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local phase = status.phase
local refused = condition(status, "InvalidSpec")
if (phase == "Pending" or phase == "Running") and refused ~= nil and refused.status == "True" then
  -- A refused change: the cluster does not run what Git says.
  hs.status = "Degraded"
  hs.message = message(status, "InvalidSpec", "The spec change was refused")
  return hs
end
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message(status, "Succeeded", "Training finished")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message(status, "Failed", "Training failed")
elseif phase == "Suspended" or suspend then
  hs.status = "Suspended"
  hs.message = message(status, "Suspended", "Suspended")
elseif phase == "Pending" or phase == "Running" then
  hs.status = "Progressing"
  local p = status.progress
  if phase == "Running" and p ~= nil and p.step ~= nil and p.totalSteps ~= nil and p.totalSteps > 0 then
    hs.message = "Running: step " .. tostring(p.step) .. "/" .. tostring(p.totalSteps)
  else
    hs.message = message(status, "Progressing", phase)
  end
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
