"""The sm_90a forward is only used where its code exists. A build for plain sm_90 (or a PTX JIT
for it) compiles the wgmma kernel body empty, yet reports binaryVersion 90 like sm_90a, so
attention_sm90_supported reads tk_attention_sm90a_image from the loaded image instead: 1 only in
the sm_90a image. This checks, from the compiled cubins (no GPU), that the flag and the kernel
bodies differ between the two targets, and that the sm_90a kernels have the producer / consumer
structure (register hand-off, TMA, wgmma, named barriers)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import pytest

from tests.cuda.conftest import CSRC, NVCC, needs_nvcc

SOURCE = CSRC / "attention" / "attention_fwd_sm90.cu"
FLAG = "_ZN2tk24tk_attention_sm90a_imageE"


def _cuobjdump() -> str | None:
    cands = [shutil.which("cuobjdump"), NVCC and os.path.join(os.path.dirname(NVCC), "cuobjdump")]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def elf_symbol_bytes(image: bytes, name: str) -> bytes | None:
    """The initial bytes of a data symbol in an ELF64 image; zeros for one in a NOBITS section
    (.nv.global: zero-initialised); None when the symbol is absent."""
    (shoff,) = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * shentsize) for i in range(shnum)]
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        strtab_off = sections[link][4]
        for at in range(offset, offset + size, entsize):
            st_name, _, _, shndx, value, st_size = struct.unpack_from("<IBBHQQ", image, at)
            end = image.index(b"\0", strtab_off + st_name)
            if image[strtab_off + st_name : end].decode() != name:
                continue
            sec = sections[shndx]
            if sec[1] == 8:  # SHT_NOBITS
                return bytes(st_size)
            return image[sec[4] + value : sec[4] + value + st_size]
    return None


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sm90_arch")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the triton wheel)")
    out = {}
    for arch in ("90", "90a"):
        cubin = tmp / f"fwd_sm_{arch}.cubin"
        cmd = [
            NVCC,
            "-std=c++17",
            "-O3",
            f"-I{CSRC}",
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "--Werror",
            "all-warnings",
            "-cubin",
            str(SOURCE),
            "-o",
            str(cubin),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        kernels = dict(
            re.findall(r"Function : (\S*attention_fwd_sm90_kernel\S*)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.DOTALL)
        )
        out[arch] = (cubin.read_bytes(), kernels)
    return out


@needs_nvcc
def test_probe_is_set_only_in_the_sm90a_image(images):
    flags = {arch: elf_symbol_bytes(image, FLAG) for arch, (image, _) in images.items()}
    assert flags == {"90": struct.pack("<i", 0), "90a": struct.pack("<i", 1)}


@needs_nvcc
def test_kernel_body_only_in_the_sm90a_image(images):
    for arch, (_, kernels) in images.items():
        assert len(kernels) == 24, f"sm_{arch}: fp16 / bf16 x head dims 64 / 128 x K = 1, 2, 4 x softcap or not"
        for name, sass in kernels.items():
            ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
            if arch == "90":
                body = [o for o in ops if o != "NOP"]
                assert not any(o.startswith("HGMMA") for o in ops) and len(body) < 8, (name, body)
                continue
            # 1 producer warpgroup (24 registers) + 2 MMA warpgroups (240), TMA loads, wgmma,
            # ping-pong on named barriers, mbarrier hand-offs, no CTA barrier after the prologue
            assert "USETMAXREG.DEALLOC.CTAPOOL 0x18" in sass
            assert re.search(r"USETMAXREG\.TRY_ALLOC\.CTAPOOL UP\d, 0xf0", sass), name
            count = lambda prefix: sum(o.startswith(prefix) for o in ops)  # noqa: E731
            assert count("HGMMA") and count("UTMALDG"), name
            assert count("BAR.ARV") and count("SYNCS.ARRIVE.TRANS64"), name
            assert count("BAR.SYNC") >= 2, name


def test_elf_reader_on_a_handmade_image():
    # header, a PROGBITS section holding 7, a NOBITS one, a symtab of two symbols and its strings
    names = b"\0a\0b\0"
    data = struct.pack("<i", 7)
    sym = (
        struct.pack("<IBBHQQ", 0, 0, 0, 0, 0, 0)
        + struct.pack("<IBBHQQ", 1, 0, 0, 1, 0, 4)
        + struct.pack("<IBBHQQ", 3, 0, 0, 2, 0, 4)
    )
    data_off, names_off, sym_off = 64, 64 + len(data), 64 + len(data) + len(names)
    shoff = sym_off + len(sym)
    hdr = bytearray(64)
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HH", hdr, 0x3A, 64, 5)
    sh = [
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack("<IIQQQQIIQQ", 0, 1, 0, 0, data_off, 4, 0, 0, 4, 0),
        struct.pack("<IIQQQQIIQQ", 0, 8, 0, 0, 0, 4, 0, 0, 4, 0),
        struct.pack("<IIQQQQIIQQ", 0, 2, 0, 0, sym_off, len(sym), 4, 0, 8, 24),
        struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, names_off, len(names), 0, 0, 1, 0),
    ]
    image = bytes(hdr) + data + names + sym + b"".join(sh)
    assert elf_symbol_bytes(image, "a") == data
    assert elf_symbol_bytes(image, "b") == bytes(4)
    assert elf_symbol_bytes(image, "c") is None
