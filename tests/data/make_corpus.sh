#!/usr/bin/env bash
# Regenerates the tiny synthetic test corpus under tests/data/.
#
#   bash tests/data/make_corpus.sh
#
# Needs espeak-ng, sox, lame and python3 (numpy + soundfile). The tests only
# read the committed output and do NOT need these tools.
#
# Idempotent: it deletes and rebuilds the folders it owns
# (cv-en/, cv-as/, bad/, long/). README.md and this script are left alone.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

for tool in espeak-ng sox lame python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "make_corpus.sh: '$tool' not found" >&2; exit 1; }
done

rm -rf cv-en cv-as bad long
mkdir -p cv-en/clips cv-as/clips bad/good long

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/wav"

# speak TEXT VOICE SPEED OUT_WAV  -> 16 kHz mono 16-bit WAV
speak() {
  espeak-ng -v "$2" -s "$3" -w "$TMP/raw.wav" "$1"
  sox -q -R -G "$TMP/raw.wav" -r 16000 -c 1 -b 16 "$4"
}
# to_mp3 IN_WAV OUT_MP3  -> 32 kbps mono MP3 (MPEG-2 layer III, 16 kHz)
to_mp3() {
  lame --quiet -b 32 -m m "$1" "$2"
}

# ---------------------------------------------------------------- cv-en ----
# 8 sentences from a ~20 word vocabulary, x 4 voice variants = 32 clips,
# plus a 9th sentence containing literal double quotes (train only) = clip 33.
EN_SENTENCES=(
  "the cat sat down"
  "open the red door"
  "the dog can run"
  "i see a blue ball"
  "we go home now"
  "my cat is big"
  "the red ball is little"
  "open the door now"
)
EN_QUOTE='say "hello" to me'
# voice|speed|gender   (variant 1-3 -> train, variant 4 -> dev/test)
EN_VOICES=(
  "en+m1|150|male_masculine"
  "en+f2|140|female_feminine"
  "en+m3|170|male_masculine"
  "en+f4|160|female_feminine"
)

: > "$TMP/en_plan.tsv"   # file \t sentence \t variant_index \t voice \t gender
n=0
for vi in "${!EN_VOICES[@]}"; do
  IFS='|' read -r voice speed gender <<<"${EN_VOICES[$vi]}"
  for sentence in "${EN_SENTENCES[@]}"; do
    n=$((n + 1))
    name="$(printf 'common_voice_en_%06d' "$n")"
    speak "$sentence" "$voice" "$speed" "$TMP/wav/$name.wav"
    to_mp3 "$TMP/wav/$name.wav" "cv-en/clips/$name.mp3"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name.mp3" "$sentence" "$vi" "$voice-$speed" "$gender" >> "$TMP/en_plan.tsv"
  done
done
n=$((n + 1))
name="$(printf 'common_voice_en_%06d' "$n")"
IFS='|' read -r voice speed gender <<<"${EN_VOICES[0]}"
speak "$EN_QUOTE" "$voice" "$speed" "$TMP/wav/$name.wav"
to_mp3 "$TMP/wav/$name.wav" "cv-en/clips/$name.mp3"
printf '%s\t%s\t%s\t%s\t%s\n' "$name.mp3" "$EN_QUOTE" "quote" "$voice-$speed" "$gender" >> "$TMP/en_plan.tsv"

# ---------------------------------------------------------------- cv-as ----
AS_SENTENCES=(
  "মই ভাত খাওঁ"
  "আজি বৰষুণ দিছে"
  "তুমি কেনে আছা"
  "এইটো মোৰ ঘৰ"
  "সি গান গাইছে"
  "আমি বজাৰলৈ যাম"
)
# sentences 1-4 -> train (two speakers), 5-6 -> dev/test (a third speaker)
AS_VOICES=(
  "as+m1|150|male|train"
  "as+m3|165|male|train"
  "as+m1|150|male|train"
  "as+m3|165|male|train"
  "as+f2|140|female|dev"
  "as+f2|140|female|dev"
)
: > "$TMP/as_plan.tsv"   # file \t sentence \t split \t voice \t gender
for i in "${!AS_SENTENCES[@]}"; do
  IFS='|' read -r voice speed gender split <<<"${AS_VOICES[$i]}"
  name="$(printf 'common_voice_as_%06d' "$((i + 1))")"
  speak "${AS_SENTENCES[$i]}" "$voice" "$speed" "$TMP/wav/$name.wav"
  to_mp3 "$TMP/wav/$name.wav" "cv-as/clips/$name.mp3"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name.mp3" "${AS_SENTENCES[$i]}" "$split" "$voice-$speed" "$gender" >> "$TMP/as_plan.tsv"
done

# ------------------------------------- metadata, bad/ and long/ (python) ----
python3 - "$TMP" <<'PY'
import csv
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import soundfile as sf

tmp = sys.argv[1]
SR = 16000


def sha(s, algo="sha512"):
    return hashlib.new(algo, s.encode("utf-8")).hexdigest()


def read_plan(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def write_tsv(path, header, rows):
    # Written by hand (no csv quoting): Common Voice TSVs are read with
    # quoting off, so literal double quotes must stay unescaped.
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            assert all("\t" not in c and "\n" not in c for c in row), row
            f.write("\t".join(row) + "\n")


def to_mp3(wav, mp3):
    subprocess.run(["lame", "--quiet", "-b", "32", "-m", "m", wav, mp3], check=True)


# ---- cv-en (modern layout) ----
EN_HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain",
             "up_votes", "down_votes", "age", "gender", "accents", "variant",
             "locale", "segment"]
en_plan = read_plan(os.path.join(tmp, "en_plan.tsv"))
en_rows = {}
for fname, sentence, vi, voice, gender in en_plan:
    en_rows[fname] = [sha(voice), fname, sha(sentence, "sha256"), sentence, "",
                      "2", "0", "twenties", gender, "", "", "en", ""]
train = [en_rows[p[0]] for p in en_plan if p[2] in ("0", "1", "2", "quote")]
dev = [en_rows[p[0]] for p in en_plan if p[2] == "3"]
validated = [en_rows[p[0]] for p in en_plan]
write_tsv("cv-en/train.tsv", EN_HEADER, train)
write_tsv("cv-en/dev.tsv", EN_HEADER, dev)
write_tsv("cv-en/test.tsv", EN_HEADER, dev)
write_tsv("cv-en/validated.tsv", EN_HEADER, validated)
write_tsv("cv-en/clip_durations.tsv", ["clip", "duration[ms]"],
          [[p[0], str(int(round(sf.info(os.path.join("cv-en/clips", p[0])).duration * 1000)))]
           for p in en_plan])

# ---- cv-as (old layout: no sentence_id, `accent` singular) ----
AS_HEADER = ["client_id", "path", "sentence", "up_votes", "down_votes", "age",
             "gender", "accent", "locale", "segment"]
as_plan = read_plan(os.path.join(tmp, "as_plan.tsv"))
as_rows = {p[0]: [sha(p[3]), p[0], p[1], "2", "0", "thirties", p[4], "", "as", ""]
           for p in as_plan}
as_train = [as_rows[p[0]] for p in as_plan if p[2] == "train"]
as_dev = [as_rows[p[0]] for p in as_plan if p[2] == "dev"]
write_tsv("cv-as/train.tsv", AS_HEADER, as_train)
write_tsv("cv-as/dev.tsv", AS_HEADER, as_dev)
write_tsv("cv-as/test.tsv", AS_HEADER, as_dev)

# ---- helpers for concatenated long audio ----
text_of = {p[0]: p[1] for p in en_plan}
wav_of = lambda mp3name: os.path.join(tmp, "wav", mp3name[:-4] + ".wav")
# interleave voices: sentence 1 voice 1, sentence 2 voice 2, ...
order = []
for k in range(32):
    s, v = k % 8, (k + k // 8) % 4
    order.append(en_plan[v * 8 + s][0])


def build_long(target_s, out_mp3, out_txt=None, pause_s=0.3):
    pause = np.zeros(int(pause_s * SR), dtype=np.float32)
    parts, texts, total = [], [], 0
    i = 0
    while True:
        name = order[i % len(order)]
        audio, sr = sf.read(wav_of(name), dtype="float32")
        assert sr == SR
        if total + len(audio) + len(pause) > target_s * SR:
            break
        parts += [audio, pause]
        texts.append(text_of[name])
        total += len(audio) + len(pause)
        i += 1
    audio = np.concatenate(parts)
    audio = np.pad(audio, (0, target_s * SR - len(audio)))  # silence to exact length
    wav = os.path.join(tmp, os.path.basename(out_mp3) + ".wav")
    sf.write(wav, audio, SR, subtype="PCM_16")
    to_mp3(wav, out_mp3)
    text = " ".join(texts)
    if out_txt:
        with open(out_txt, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return text


# ---- long/ ----
build_long(45, "long/long_45s.mp3", "long/long_45s.txt")

# ---- bad/ ----
rows = []
good = [p[0] for p in en_plan[:10]]
for name in good:
    shutil.copyfile(os.path.join("cv-en/clips", name), os.path.join("bad/good", name))
    rows.append(["good/" + name, text_of[name]])

# listed but absent
rows.append(["missing.mp3", "this file does not exist"])
# random bytes, deterministic; 0xFF removed so no MPEG frame sync can appear
rng = np.random.default_rng(1234)
junk = rng.integers(0, 255, size=2048, dtype=np.uint8)  # 0..254
with open("bad/corrupt.mp3", "wb") as f:
    f.write(junk.tobytes())
rows.append(["corrupt.mp3", "random bytes not audio"])
# first 300 bytes of a good mp3
src = os.path.join("cv-en/clips", en_plan[10][0])
with open(src, "rb") as f:
    head = f.read(300)
with open("bad/truncated.mp3", "wb") as f:
    f.write(head)
rows.append(["truncated.mp3", text_of[en_plan[10][0]]])
# valid WAV header, zero samples
sf.write("bad/empty.wav", np.zeros(0, dtype=np.int16), SR, subtype="PCM_16")
rows.append(["empty.wav", "an empty wave file"])
# float32, 1 s, with NaN and +/-inf
t = np.arange(SR, dtype=np.float32) / SR
x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
x[1000:1100] = np.nan
x[5000] = np.inf
x[6000] = -np.inf
x[8000:8050] = np.nan
# header written by hand: libsndfile would add a PEAK chunk with a timestamp
# (non-reproducible output) and may inspect the samples.
import struct
data = x.astype("<f4").tobytes()
fmt = struct.pack("<HHIIHH", 3, 1, SR, SR * 4, 4, 32)  # WAVE_FORMAT_IEEE_FLOAT
with open("bad/nan.wav", "wb") as f:
    f.write(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE")
    f.write(b"fmt " + struct.pack("<I", len(fmt)) + fmt)
    f.write(b"data" + struct.pack("<I", len(data)) + data)
rows.append(["nan.wav", "not a number"])
# good speech, stereo 48 kHz PCM16 (must be resampled, not skipped)
n_st = en_plan[11][0]
subprocess.run(["sox", "-q", "-R", "-G", wav_of(n_st), "-r", "48000", "-c", "2", "-b", "16",
                "bad/stereo_48k.wav"], check=True)
rows.append(["stereo_48k.wav", text_of[n_st]])
# good speech, mono 8 kHz PCM16
n_8k = en_plan[12][0]
subprocess.run(["sox", "-q", "-R", "-G", wav_of(n_8k), "-r", "8000", "-c", "1", "-b", "16",
                "bad/mono_8k.wav"], check=True)
rows.append(["mono_8k.wav", text_of[n_8k]])
# 35 s of speech (> 30 s Whisper window)
long_text = build_long(35, "bad/long_35s.mp3")
rows.append(["long_35s.mp3", long_text])
# good audio, empty / whitespace-only / over-long transcripts
for fname, idx in (("empty_text.mp3", 13), ("blank_text.mp3", 14), ("overlong_text.mp3", 15)):
    shutil.copyfile(os.path.join("cv-en/clips", en_plan[idx][0]), os.path.join("bad", fname))
rows.append(["empty_text.mp3", ""])
rows.append(["blank_text.mp3", "   "])
s = text_of[en_plan[15][0]]
rows.append(["overlong_text.mp3", " ".join([s] * (3000 // (len(s) + 1) + 1))])

with open("bad/manifest.csv", "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)  # minimal quoting
    w_all = csv.writer(f, quoting=csv.QUOTE_ALL)  # makes "" and "   " explicit
    w.writerow(["path", "text"])
    for row in rows:
        (w_all if not row[1].strip() else w).writerow(row)
PY

echo "make_corpus.sh: done"
du -sh "$HERE"
