-- arith.lua: a reward script for moerl (recipes/rewards-lua.yaml).
-- reward(sample) gets prompt, completion, tokens, truncated and every field of the dataset row, and returns a
-- number, or nil and a reason when it cannot judge the sample (counted as unscorable, never read as 0).
-- The sandbox has string (no dump), table, math, utf8, coroutine and the safe base functions; no io or os.

local function final_answer(text)
  local inner = text:match("<answer>(.-)</answer>")
  if inner == nil then return nil end
  inner = inner:gsub("[%s,$]", "")        -- spaces, thousands separators, dollar signs
  return tonumber(inner)
end

function reward(sample)
  local want = tonumber(sample.answer)
  if want == nil then return nil, "the row has no numeric 'answer'" end
  local got = final_answer(sample.completion)
  if got == nil then return nil, "no <answer> tag" end
  if math.abs(got - want) <= 1e-9 * math.max(1, math.abs(want)) then
    -- a small bonus for a short completion: 1.0 at most, down to 0.9 at 200 characters and beyond
    return 1.0 - 0.1 * math.min(#sample.completion, 200) / 200
  end
  return 0.0
end
