-- Orthanc auto-routing to dicom-node (docs/pacs-integration.md).
--
-- Install: add this file to Orthanc's "LuaScripts" and register the node
-- under "DicomModalities" as "dicom-node" (or change NODE below).
--
-- Each series is sent once, when Orthanc considers it stable (no new
-- instance for "StableAge" seconds), if its modality is one the node's
-- routes handle.  What the node sent (its results, whose calling AE is
-- NODE_AET) is never sent back to it, so results arriving in the study
-- start no loop.

local NODE = 'dicom-node'       -- the node's name under DicomModalities
local NODE_AET = 'DICOM_NODE'   -- the node's node.ae_title
local MODALITIES = { CT = true, MR = true, DX = true, CR = true }

function OnStableSeries(seriesId, tags, metadata)
  if not MODALITIES[tags['Modality'] or ''] then
    return
  end
  local instances = ParseJson(RestApiGet('/series/' .. seriesId))['Instances']
  if #instances == 0 then
    return
  end
  local sender = RestApiGet('/instances/' .. instances[1] .. '/metadata/RemoteAET')
  if sender == NODE_AET then
    return  -- the node's own results
  end
  -- An asynchronous Orthanc job: it shows under Jobs in Orthanc Explorer,
  -- with its retries, like a manual "Send to DICOM modality".
  RestApiPost('/modalities/' .. NODE .. '/store',
              '{"Resources": ["' .. seriesId .. '"], "Synchronous": false}')
  print('dicom-node auto-routing: series ' .. seriesId .. ' (' .. tags['Modality'] .. ' from ' ..
        sender .. ') queued')
end
