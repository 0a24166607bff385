#!/usr/bin/env bash
# bash scripts/get-sst2.sh [DEST]: fetches GLUE SST-2 (train.tsv, dev.tsv: sentence<TAB>label, 0 negative / 1
# positive) for the SST-2 recipes into DEST (default data/sst2, which git ignores), checks the files' sha256, and
# prints the override that points the recipes there. Needs the network; nothing here downloads at training time.
# The archive is GLUE's own (SST2_URL overrides it, e.g. a mirror); cite Socher et al. (2013) and Wang et al. (2018).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/data/sst2}"
URL="${SST2_URL:-https://dl.fbaipublicfiles.com/glue/data/SST-2.zip}"
declare -A SHA256=(
  [train.tsv]=48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1
  [dev.tsv]=54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0
)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "get-sst2: downloading $URL"
if ! python3 -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" \
    "$URL" "$scratch/sst2.zip"; then
  echo "get-sst2: could not download $URL: check the network, or set SST2_URL to a copy of GLUE's SST-2.zip" >&2
  exit 1
fi
python3 - "$scratch/sst2.zip" "$scratch" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as archive:
    for name in ("train.tsv", "dev.tsv"):
        member = next((m for m in archive.namelist() if m.endswith(f"SST-2/{name}") or m == name), None)
        if member is None:
            sys.exit(f"get-sst2: the archive has no SST-2/{name}")
        with archive.open(member) as source, open(f"{sys.argv[2]}/{name}", "wb") as target:
            target.write(source.read())
PY
for name in train.tsv dev.tsv; do
  got=$(sha256sum "$scratch/$name" | cut -d' ' -f1)
  if [ "$got" != "${SHA256[$name]}" ]; then
    echo "get-sst2: $name has sha256 $got, not GLUE SST-2's ${SHA256[$name]}: not written" >&2
    exit 1
  fi
done
mkdir -p "$DEST"
mv "$scratch/train.tsv" "$scratch/dev.tsv" "$DEST/"
echo "get-sst2: GLUE SST-2 in $DEST (67,349 training rows, 872 dev rows)"
echo "train with: ... +recipe=lora_minilm_sst2 data.train_file=$DEST/train.tsv data.eval_file=$DEST/dev.tsv"
