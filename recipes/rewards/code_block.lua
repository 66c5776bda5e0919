-- code_block.lua: a shaping reward for recipes/grpo-code.yaml: 1 when the completion holds one closed ```python
-- block, 0.5 for an unclosed one, 0 otherwise. The code plugin beside it runs the tests.
function reward(sample)
  local c = sample.completion
  local _, opened = c:gsub("```python", "")
  if opened == 0 then return 0.0 end
  if c:match("```python.-\n```") then return 1.0 end
  return 0.5
end
