// A1111 "infotext" reading for ldm serve's page: pure functions, no page state (app.js uses them).
// Format (A1111 modules/infotext_utils.py; ldm.infotext writes and reads it the same way):
//   <prompt lines>
//   Negative prompt: <negative prompt lines>
//   Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512
"use strict";

const NEGATIVE = "Negative prompt:";
// One "Key: value" pair of the last line (A1111 infotext_utils.re_param; ldm.infotext._RE_PARAM)
const RE_PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

function unquote(value) {
  if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) {
    try {
      return JSON.parse(value);
    } catch {
      return value;
    }
  }
  return value.trim();
}

// The inverse of A1111's infotext (ldm.infotext.parse_infotext reads it the same way):
// prompt lines, then "Negative prompt: ..." lines, then one "Key: value, ..." line.
function parseInfotext(text) {
  const lines = text.replace(/\s+$/, "").split("\n");
  const params = {};
  const pairs = [...lines[lines.length - 1].matchAll(RE_PARAM)];
  if (pairs.length >= 3) {
    lines.pop();
    for (const [, label, raw] of pairs) params[label.trim()] = unquote(raw);
  }
  let start = lines.findIndex((l) => l.startsWith(NEGATIVE));
  if (start < 0) start = lines.length;
  const negative = lines.slice(start).join("\n").slice(NEGATIVE.length);
  return {
    prompt: lines.slice(0, start).join("\n"),
    negative: negative.startsWith(" ") ? negative.slice(1) : negative,
    params,
  };
}

const key = (s) => String(s).trim().toLowerCase().replace(/\s+/g, " ");

function findChoice(list, name) {
  const k = key(name);
  return list.find((c) => [c.name, c.label, ...(c.aliases || [])].some((n) => n && key(n) === k));
}

// "Sampler" and "Schedule type" -> the select values; old infotexts (A1111 < 1.9) fold the
// schedule into the sampler ("DPM++ 2M Karras"), and no schedule type means "Automatic".
function matchSampler(samplerText, scheduleText, samplers, schedulers) {
  let sampler = findChoice(samplers, samplerText);
  let schedule = scheduleText;
  if (!sampler && scheduleText === undefined) {
    for (const s of schedulers) {
      const label = s.label || s.name;
      if (key(samplerText).endsWith(` ${key(label)}`)) {
        sampler = findChoice(samplers, samplerText.slice(0, -label.length));
        if (sampler) {
          schedule = label;
          break;
        }
      }
    }
  }
  return { sampler, schedule: findChoice(schedulers, schedule ?? "Automatic") };
}
