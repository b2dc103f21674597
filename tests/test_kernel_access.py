"""livegen.bench.kernel_access: sector efficiency read from inductor's generated Triton source.

The fixture is two kernels and their launches cut from inductor's wrapper for SD-Turbo's UNet
compiled with a dynamic batch (torch 2.11's CUDA code generation, benchmarks/inductor_codegen.py):
a GroupNorm's statistics over an NCHW concatenation, then its normalize + SiLU kernel, which
reads that NCHW buffer in order and writes two channels_last outputs, one element per sector.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from livegen.bench import kernel_access

FIXTURE = Path(__file__).parent / "bench_data" / "inductor_groupnorm_dyn.txt"


def test_the_strided_stores_of_a_generated_kernel_use_one_sixteenth_of_their_sectors() -> None:
    stats, apply = list(kernel_access.launches(FIXTURE.read_text(), {"s26": 16}))
    assert stats.kernel.endswith("native_group_norm_116") and stats.numels == {"x": 32 * 16, "r0_": 20480}
    [load, *outputs] = stats.accesses
    assert load.kind == "load" and load.full_size and load.efficiency == 1.0
    assert outputs and not any(a.full_size for a in outputs)  # one mean / variance per group
    assert stats.bytes() == (32 * 16 * 20480 * 2, 32 * 16 * 20480 * 2)

    n = 655360 * 16
    assert apply.numels == {"x": n}
    full = {(a.kind, a.pointer): a.efficiency for a in apply.accesses if a.full_size}
    assert full == {("load", "in_ptr0"): 1.0, ("store", "out_ptr2"): 1 / 16, ("store", "out_ptr3"): 1 / 16}
    moved, sectors = apply.bytes()
    assert moved == 3 * n * 2 and sectors == pytest.approx(n * 2 + 2 * 16 * n * 2)


def kernel_source(name: str, body: str, signature: str) -> str:
    return (
        f"{name} = async_compile.triton('{name}', '''\n@triton_heuristics.pointwise(\n"
        f"    triton_meta={{'signature': {{{signature}}}}},\n)\n@triton.jit\n{body}''', device_str='cuda')\n"
    )


def test_a_tiled_kernel_is_read_along_the_axis_each_access_is_contiguous_in() -> None:
    """A 2-D (transposing) kernel: Triton lays each access out along its own contiguous axis, so
    both the row-major read and the column-major write count as whole sectors; a float32 read of
    every other element uses half of each sector."""
    transpose = kernel_source(
        "triton_poi_t_0",
        "def triton_poi_t_0(in_ptr0, out_ptr0, ynumel, xnumel, YBLOCK : tl.constexpr, XBLOCK : tl.constexpr):\n"
        "    yindex = yoffset + tl.arange(0, YBLOCK)[:, None]\n"
        "    xindex = xoffset + tl.arange(0, XBLOCK)[None, :]\n"
        "    x1 = xindex\n    y0 = yindex\n"
        "    tmp0 = tl.load(in_ptr0 + (x1 + 256*y0), None)\n"
        "    tl.store(out_ptr0 + (y0 + 128*x1), tmp0, None)\n",
        "'in_ptr0': '*fp16', 'out_ptr0': '*fp16', 'ynumel': 'i32', 'xnumel': 'i32'",
    )
    every_other = kernel_source(
        "triton_poi_s_1",
        "def triton_poi_s_1(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):\n"
        "    xindex = xoffset + tl.arange(0, XBLOCK)[:]\n    x0 = xindex\n"
        "    tmp0 = tl.load(in_ptr0 + (2*x0), None)\n"
        "    tl.store(out_ptr0 + (x0), tmp0, None)\n",
        "'in_ptr0': '*fp32', 'out_ptr0': '*fp32', 'xnumel': 'i32'",
    )
    wrapper = (
        transpose
        + every_other
        + (
            "\ndef call(args):\n"
            "        triton_poi_t_0.run(buf0, buf1, 128, 256, stream=stream0)\n"
            "        triton_poi_s_1.run(buf1, buf2, 4096, stream=stream0)\n"
        )
    )
    t, s = kernel_access.launches(wrapper, {})
    assert t.numels == {"y": 128, "x": 256} and [a.efficiency for a in t.accesses] == [1.0, 1.0]
    assert s.numels == {"x": 4096} and [a.efficiency for a in s.accesses] == [0.5, 1.0]
    assert s.bytes() == (2 * 4096 * 4, 4096 * 4 * 2 + 4096 * 4)


def test_the_report_lists_the_launches_that_waste_sectors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """One line per wrapper, then its launches that cost more sectors than bytes; a wrapper that
    cannot be read says so without hiding the others."""
    missing = tmp_path / "gone.py"
    kernel_access.main([str(missing), str(FIXTURE), "--sym", "s26=16"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{missing}: not read (FileNotFoundError")
    assert "2 launches" in out[1]
    assert len(out) == 3 and "native_group_norm_silu_117" in out[2] and "store out_ptr2 0.06" in out[2]


def test_the_report_bounds_what_axes_shorter_than_a_warp_may_overcount(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Rows of 10 contiguous elements, one after the other: a warp covers whole rows, but the model
    does not read along an axis shorter than 32 lanes, so it reads along the rows (20-byte stride:
    1/10 of each sector). The report says how much of its total that may overstate."""
    rows = kernel_source(
        "triton_poi_r_0",
        "def triton_poi_r_0(in_ptr0, out_ptr0, ynumel, xnumel, YBLOCK : tl.constexpr, XBLOCK : tl.constexpr):\n"
        "    yindex = yoffset + tl.arange(0, YBLOCK)[:, None]\n"
        "    xindex = xoffset + tl.arange(0, XBLOCK)[None, :]\n"
        "    x1 = xindex\n    y0 = yindex\n"
        "    tmp0 = tl.load(in_ptr0 + (x1 + 10*y0), None)\n"
        "    tl.store(out_ptr0 + (x1 + 10*y0), tmp0, None)\n",
        "'in_ptr0': '*fp16', 'out_ptr0': '*fp16', 'ynumel': 'i32', 'xnumel': 'i32'",
    )
    wrapper = tmp_path / "rows.py"
    launch_line = "        triton_poi_r_0.run(buf0, buf1, 10000000, 10, stream=stream0)\n"
    wrapper.write_text(rows + "\ndef call(args):\n" + launch_line)
    (launch,) = kernel_access.launches(wrapper.read_text(), {})
    assert [a.efficiency for a in launch.accesses] == [pytest.approx(0.1), pytest.approx(0.1)]
    kernel_access.main([str(wrapper)])
    out = capsys.readouterr().out.splitlines()
    assert "move 0.40 GB, cost 4.00 GB of sectors" in out[0]
    assert out[1] == (
        "  1 launches with an axis shorter than a warp: 4.000 GB of sectors for 0.400 GB; "
        "the total is at most 3.600 GB high"
    )
