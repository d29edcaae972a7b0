"""benchmarks/roofline.py, gpu.py and winograd.py run at a tiny size on the CPU, so they cannot rot."""

import glob
import importlib.util
import math
import os

import pytest
import torch

from dkdm.models import create_model, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")


def test_flops_on_the_meta_device_equal_a_real_runs_attention_included():
    """The big models are counted on meta; a real CPU run agrees once its flash attention is counted."""
    roof = _load("roofline")
    meta = roof.zoo_flops(["digits-vit"], meta_above=0)["digits-vit"]
    real = roof.zoo_flops(["digits-vit"])["digits-vit"]
    assert meta["counted_on"] == "meta" and real["counted_on"] == "cpu"
    assert meta["fwd_GFLOP_per_image"] == real["fwd_GFLOP_per_image"]
    assert meta["fwd_bwd_GFLOP_per_image"] == real["fwd_bwd_GFLOP_per_image"]
    # digits-vit: 4 blocks, 16 tokens of 128 channels; attention is 4 * 16 * 16 * 128 FLOPs per block.
    cfg = get_config("digits-vit")
    model = create_model(cfg)
    with torch.no_grad():
        x, t = torch.randn(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)
        with roof.FlopCounterMode(display=False) as plain:  # torch's counter alone misses the attention
            model(x, t)
    assert roof.count_flops(model, cfg) - plain.get_total_flops() == 4 * 4 * 16 * 16 * 128


@pytest.mark.parametrize("variant", ["F2", "F4", "F4p"])
def test_winograd_probe_computes_the_convolution_it_times(variant):
    """The Winograd probe's verdict only means something if it computes the same convolution."""
    wino = _load("winograd")
    m = len(wino.WINOGRAD[variant]["AT"])
    g = torch.Generator().manual_seed(m)
    x = torch.randn(2, 5, 8, 12, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(x, w, b, padding=1)
    out = wino.Winograd3x3(w, b, wino.WINOGRAD[variant])(x)
    assert (out - ref).abs().max() < 1e-12  # exact up to float64 rounding
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (wino.Winograd3x3(w, None, wino.WINOGRAD[variant])(x) - (ref - b.view(1, 7, 1, 1))).abs().max() < 1e-12
    with pytest.raises(ValueError, match=f"divisible by {m}"):
        wino.Winograd3x3(w, b, wino.WINOGRAD[variant])(x[:, :, :7])


def test_winograd_probe_reads_its_weights_cold():
    """Enough distinct layers that their [36, C, K] filters exceed the cache: 64 MB at 128 x 128."""
    wino = _load("winograd")
    assert wino.weight_copies(128, 128, 64.0) == 29  # 36 * 128 * 128 * 4 bytes = 2.25 MiB each
    assert wino.weight_copies(128, 128, 0.0) == 1  # one layer, warm: the old probe
    assert wino.weight_copies(3, 6, 64.0) == wino.MAX_WEIGHT_COPIES
    assert wino.weight_copies(1024, 1024, 64.0) == 1


def test_winograd_probe_tiny_finds_every_3x3_convolution(tmp_path):
    wino = _load("winograd")
    out = wino.main(["--tiny", "--out", str(tmp_path / "w.json")])
    assert (tmp_path / "w.json").is_file()
    model = create_model(get_config("digits-teacher"))
    n3x3 = sum(
        1
        for mod in model.modules()
        if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3) and mod.stride == (1, 1)
    )
    assert sum(row["layers"] for row in out["shapes"]) == n3x3
    assert out["cold_weights_mb"] == 1.0  # --tiny keeps the cold-weight cycle small
    for row in out["shapes"]:  # each shape timed over distinct layers whose filters add up to 1 MB
        assert row["weight_copies"] == wino.weight_copies(row["C"], row["K"], 1.0)
        assert row["direct_max_abs_err_vs_float64"] < 1e-5 and row["F2_max_abs_err_vs_float64"] < 1e-5
        assert row["direct_channels_last_ms"] > 0 and ("F4p_ms" in row) == (row["H"] % 4 == 0)
        assert row.get("F4p_max_abs_err_vs_float64", 0.0) < 1e-5  # the better-conditioned F(4,3)
        assert row["F2_ms"] > 0 and row["F2_speedup"] == round(row["direct_ms"] / row["F2_ms"], 3)
    assert max(row["weight_copies"] for row in out["shapes"]) > 1
    best = out["network_3x3_conv_ms_best_of_direct_and_winograd"]
    assert 0 < best <= out["network_3x3_conv_ms_best_within_max_err"] <= out["network_3x3_conv_ms_direct"]
    net = out["network_forward"]
    assert net["variant"] == "F4p" and net["winograd_layers"] == n3x3 - 2  # the library's: not the 1-in, 2-out ends
    for name in ("direct", "direct_channels_last", "F4p"):  # the whole forward, each path near float64
        assert 0 < net[f"{name}_max_abs_err_vs_float64"] < 1e-5 and net[f"{name}_ms"] > 0
    for name in ("direct_channels_last", "F4p", "F4p_over_channels_last"):  # per-round ratios
        lo, hi = net[f"{name}_speedup_min_max"]
        assert 0 < lo <= net[f"{name}_speedup"] <= hi
    (row,) = out["train_shapes"]  # the training layer: forward + backward, both paths near float64
    assert (row["N"], row["C"], row["K"], row["side"], row["tiles"]) == (2, 16, 16, 8, 8)
    assert 0 < row["direct_grad_rel_err_vs_float64"] < 1e-5 and 0 < row["winograd_grad_rel_err_vs_float64"] < 1e-5
    lo, hi = row["winograd_speedup_min_max"]
    assert row["direct_ms"] > 0 and row["winograd_ms"] > 0 and 0 < lo <= row["winograd_speedup"] <= hi


@pytest.mark.slow
def test_roofline_tiny(tmp_path):
    roof = _load("roofline")
    out = roof.main(["--tiny", "--out", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").is_file()
    assert (
        out["flops"]["digits-teacher"]["fwd_bwd_GFLOP_per_image"]
        > 2 * out["flops"]["digits-teacher"]["fwd_GFLOP_per_image"]
    )
    per = out["flops_per_call"]
    assert per["dkdm_step"] == per["teacher_fwd"] + per["student_fwd_bwd"] > 0
    one = out["per_threads"]["1"]
    assert one["peak_GFLOP_per_s"]["matmul_fp32"]["median"] > 0
    for name in ("teacher_fwd", "student_fwd_bwd", "dkdm_step", "sampling_step"):
        assert 0 < one["achieved"][name]["fraction_of_matmul_peak"]["median"] < 100
        best = one["achieved"][name]["fraction_of_best_peak"]["median"]
        assert 0 < best <= one["achieved"][name]["fraction_of_matmul_peak"]["median"] + 1e-9
    for shape in one["switches"]["attention_sdpa_over_bmm_time"].values():
        assert shape["max_abs_diff"] < 1e-5  # the two attention paths compute the same thing
    variants = one["switches"]["max_abs_diff_of_the_variant_networks"]
    assert set(variants) == {
        "teacher_copy",
        "teacher_bmm",
        "teacher_pw",
        "teacher_winograd",
        "student_bmm",
        "student_pw",
        "student_winograd",
    }
    assert max(variants.values()) < 1e-4 and variants["teacher_copy"] == 0.0  # the control is the same network
    assert variants["teacher_bmm"] > 0 and variants["teacher_winograd"] > 0  # the kernels did change
    for name in ("copy", "no_grad", "channels_last", "attention_bmm", "pointwise_torch", "winograd"):
        ratio = one["switches"][f"teacher_fwd_{name}_speedup_over_default"]
        assert ratio["n"] == 2 and ratio["median"] > 0  # one pair per round
    for name in ("attention_bmm", "pointwise_torch", "winograd"):
        assert one["switches"][f"student_fwd_bwd_{name}_speedup_over_default"]["median"] > 0
    assert one["switches"]["dkdm_step_winograd_speedup_over_default"]["n"] == 2  # the whole step, both switches
    for part in ("teacher_fwd", "student_fwd_bwd"):
        assert math.isclose(sum(out["profile"][part]["share"].values()), 1.0, abs_tol=1e-3)
    assert out["profile"]["teacher_fwd"]["share"]["conv"] > 0.1  # a UNet's time is in its convolutions


def test_attention_shapes_follow_the_unet_config():
    roof = _load("roofline")
    # cifar10-57M: 128 channels x (1,2,2,2), attention at 16 and 8 px, 32 channels per head.
    assert roof.attention_shapes(get_config("cifar10-57M"), 2) == [(2 * 8, 256, 32), (2 * 8, 64, 32)]
    q, k, v = (torch.randn(3, 10, 8, dtype=torch.float64) for _ in range(3))
    want = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1) @ v
    torch.testing.assert_close(roof.bmm_attention(q.float(), k.float(), v.float()).double(), want, atol=1e-5, rtol=0)


def test_gpu_benchmark_runs_on_cpu_at_a_tiny_size(tmp_path):
    gpu = _load("gpu")
    out = gpu.main(["--tiny", "--sample_steps", "2", "--out", str(tmp_path / "g.json")])
    assert out["device"].startswith("cpu") and "tiny" in out["note"]
    s, d = out["sampling"][0], out["dkdm_step"][0]
    assert s["image_steps_per_s"] > 0 and 0 < s["MFU"] < 10 and s["host_syncs"] == 0
    assert d["s_per_step"] > 0 and 0 < d["MFU"] < 10 and d["precision"] == "bf16"
    with pytest.raises(SystemExit):  # the suite runs on the CPU (DKDM_DEVICE=cpu), GPU or not
        gpu.parse(["--tiny", "--cuda_graphs"])


def test_gpu_benchmark_on_cuda_with_graphs_and_channels_last(tmp_path, on_cuda):
    """The CUDA path itself, where there is a GPU: graphs replay, no host syncs in steady state."""
    gpu = _load("gpu")
    out = gpu.main(["--tiny", "--cuda_graphs", "--channels_last", "--out", str(tmp_path / "g.json")])
    assert not out["device"].startswith("cpu")
    assert len(out["sampling"]) == len(out["dkdm_step"]) == 4  # 2 memory formats x graphs off/on
    assert [s["cuda_graphs"] for s in out["sampling"]] == [False, True, False, True]
    assert all(d["host_syncs"] == 0 for d in out["dkdm_step"])
    assert all(s["host_syncs"] == 0 for s in out["sampling"] if s["cuda_graphs"])


def test_cost_model_latent_unets_are_the_released_ones():
    """The cost model's LDM-VQ-4 teacher and student have CompVis's exact parameter counts (FACTS.md)."""
    cm = _load("cost_model")
    for channels, params in ((224, 274_056_163), (128, 89_535_619)):
        with torch.device("meta"):
            model = create_model(cm._ldm_unet(channels))
        assert sum(p.numel() for p in model.parameters()) == params
    assert cm.SETTINGS["FFHQ 256 (latent)"][2:5] == (42, 4.0, 640_000)  # supplement Table 7


@pytest.mark.skipif(not os.environ.get("GUIDED_DIFFUSION_PATH"), reason="GUIDED_DIFFUSION_PATH names no checkout")
@pytest.mark.parametrize("switch", [[], ["--ours_channels_last"], ["--ours_channels_last", "--ours_winograd"]])
def test_side_by_side_with_guided_diffusion_agrees(switch):
    vs = _load("vs_guided_diffusion")
    out = vs.main(["--batch", "1", "--respacing", "2", "--rounds", "1", *switch])
    assert out["ours_channels_last"] == ("--ours_channels_last" in switch)
    assert out["ours_winograd"] == ("--ours_winograd" in switch)
    assert out["agree_to_tol"], out["max_abs_diff"]
    assert out["max_abs_diff"]["ddim"] <= 1e-4 and out["max_abs_diff"]["weights_after_step"] <= 1e-4
    for loop in ("iddpm", "ddim"):  # the float64 reference is guided-diffusion's own network
        assert 0 < out["max_abs_diff_from_float64"][loop]["theirs"] < 1e-3


def test_the_comparison_figure_is_drawn_from_the_committed_results(tmp_path):
    plot = _load("plot_vs_guided_diffusion")
    results = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*vs_guided_diffusion*.json")))
    assert len(results) >= 2
    out = tmp_path / "vs.png"
    drawn = plot.plot(results, str(out))
    assert out.stat().st_size > 10_000 and len(drawn) == len(results)
    labels = [plot.label(r) for r in drawn]
    assert any("CPU, 1 thread" in x for x in labels) and any("ours compiled" in x for x in labels)
    assert any("CPU (AVX2), 1 thread" in x and "ours channels_last" in x for x in labels)
    assert plot.label({"device": "cpu", "threads": 2, "batch": 4, "cpu": "X (AVX-512)"}).startswith(
        "CPU (AVX-512), 2 threads"
    )
    assert plot.label({"device": "cpu", "threads": 1, "batch": 4, "cpu": "X"}).startswith("CPU, 1 thread")
    zen4 = {"device": "cpu", "threads": 1, "batch": 4, "cpu": "AMD EPYC (AVX-512; family 25 model 17)"}
    assert plot.label(zen4).startswith("CPU (AVX-512), 1 thread\nfamily 25 model 17\nbatch 4")
    numbers_only = {"device": "cpu", "threads": 1, "batch": 4, "cpu": "X (family 6 model 85)"}
    assert plot.label(numbers_only).startswith("CPU, 1 thread\nfamily 6 model 85\nbatch 4")


def test_switch_pairs_alternate_their_order_and_divide_within_the_pair():
    """A switch's ratio is its own pair's (library time / variant time), and which of the two runs
    first alternates by round and by switch, so neither side always takes the first-place cost."""
    roof = _load("roofline")
    calls, cost = [], {"base_a": 2.0, "var_a": 1.0, "base_b": 3.0, "var_b": 6.0}

    def clock(fn):
        calls.append(fn.__name__)
        return cost[fn.__name__]

    def named(name):
        def fn():
            return None

        fn.__name__ = name
        return fn

    switches = {"a": (named("base_a"), named("var_a")), "b": (named("base_b"), named("var_b"))}
    assert roof.time_switch_pairs(switches, 0, clock) == {"a": 2.0, "b": 0.5}
    assert calls == ["base_a", "var_a", "var_b", "base_b"]
    calls.clear()
    roof.time_switch_pairs(switches, 1, clock)
    assert calls == ["var_a", "base_a", "base_b", "var_b"]
