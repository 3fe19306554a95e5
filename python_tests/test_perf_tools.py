"""The peers benchmark and its plot script, on CPU ranks: the benchmark's
rows check their outputs and write CSV; the plot script turns the checked-in
sample CSV into PNGs (so that neither can rot between GPU runs)."""

import csv
import subprocess
import sys

from conftest import REPO, run_ranks

SAMPLE = REPO / "benchmarks" / "peers" / "sample_cpu.csv"


def test_peers_benchmark_checks_every_row_and_writes_csv(tmp_path):
    out = tmp_path / "peers.csv"
    output = run_ranks(2, REPO / "benchmarks" / "peers" / "bench_peers.py", "--cpu",
                       "--hidden", "64", "--tokens", "16", "--iters", "3",
                       "--csv", out)
    assert "MISMATCH" not in output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["row"] for r in rows} == {"hostfuse collective", "torch a2a"}
    assert all(r["check"] == "ok" for r in rows)
    assert all(float(r["median_us"]) > 0 for r in rows)


def test_peers_benchmark_dumps_what_nccl_ep_bench_reads(tmp_path):
    # nccl_ep_bench (NCCL >= 2.30, not built here) reads these files: their
    # sizes and meta.tsv's fields are its format.
    dump = tmp_path / "dump"
    run_ranks(2, REPO / "benchmarks" / "peers" / "bench_peers.py", "--cpu",
              "--hidden", "256", "--tokens", "16", "24", "--iters", "2", "--dump", dump)
    lines = [line.split("\t") for line in (dump / "meta.tsv").read_text().splitlines()]
    config = {f[1]: f[2] for f in lines if f[0] == "config"}
    assert config == {"hidden": "256", "topk": "8", "experts": "16", "ranks": "2",
                      "device": "cpu (gloo)"}
    assert [f[1] for f in lines if f[0] == "tokens"] == ["16", "24"]
    times = [f for f in lines if f[0] == "time"]
    assert {(f[1], f[2], f[3]) for f in times} >= {
        ("16", "torch a2a", "dispatch"), ("24", "hostfuse collective", "combine")}
    assert all(len(f) == 5 and float(f[4]) > 0 for f in times)
    for tokens in (16, 24):
        for rank in (0, 1):
            base = dump / f"T{tokens}" / f"rank{rank}"
            sizes = {p.name: p.stat().st_size for p in base.iterdir()}
            assert sizes == {"x.bin": tokens * 256 * 2, "idx.bin": tokens * 8 * 8,
                             "w.bin": tokens * 8 * 4, "counts.bin": 8 * 8,
                             "out.bin": tokens * 256 * 2}
    # The expert ids are those of the run: in range and distinct per token.
    import numpy
    idx = numpy.fromfile(dump / "T16" / "rank1" / "idx.bin", dtype=numpy.int64).reshape(16, 8)
    assert idx.min() >= 0 and idx.max() < 16
    assert all(len(set(row)) == 8 for row in idx.tolist())
    counts = numpy.fromfile(dump / "T16" / "rank0" / "counts.bin", dtype=numpy.int64)
    both = [numpy.fromfile(dump / "T16" / f"rank{r}" / "idx.bin", dtype=numpy.int64)
            for r in (0, 1)]
    # Rank 0 holds experts 0..7: its counts are the picks of them.
    assert counts.tolist() == [int(sum((b == e).sum() for b in both)) for e in range(8)]


def test_plot_script_makes_pngs_from_the_sample(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_perf.py"), str(SAMPLE),
         "--out", str(tmp_path), "--prefix", "sample"],
        capture_output=True, text=True, check=True)
    written = done.stdout.split()
    assert len(written) == 2
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_script_names_missing_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("tokens,median_us\n1,2\n")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plot_perf.py"), str(bad),
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "lacks the columns" in done.stderr


def test_plot_scripts_refuse_unreadable_and_malformed_csvs_by_name(tmp_path):
    header = ("date,device,ranks,tokens,hidden,topk,experts,row,phase,median_us,"
              "bytes,gbps,check\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    words = tmp_path / "words.csv"
    words.write_text(header + "d,cpu,2,abc,64,8,16,torch a2a,dispatch,1.0,1,1,ok\n")
    slow = tmp_path / "slow.csv"
    slow.write_text(header + "d,cpu,2,32,64,8,16,torch a2a,dispatch,fast,1,1,ok\n")
    layer = tmp_path / "layer.csv"
    layer.write_text("device,ranks,tokens,hidden,intermediate,experts,topk,modes,stage,"
                     "time_us,floor_us\ngpu,1,128,7168,2048,8,8,m,router,1.5,x\n")
    image = tmp_path / "plot.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    short = tmp_path / "short.csv"
    short.write_text(header + "d,cpu,2,32\n")
    for script, path, message in (
            ("plot_perf.py", image, f"{image} is not a CSV file"),
            ("plot_perf.py", short, f"{short}, line 2: fewer fields than the header"),
            ("plot_perf.py", tmp_path / "missing.csv",
             "cannot read " + str(tmp_path / "missing.csv")),
            ("plot_layer.py", tmp_path / "missing.csv", "cannot read"),
            ("plot_perf.py", empty, f"{empty} is empty (no header line)"),
            ("plot_perf.py", words, f"{words}, line 2: tokens = 'abc' is not an integer"),
            ("plot_perf.py", slow, "median_us = 'fast' is not a number"),
            ("plot_layer.py", layer, "floor_us = 'x' is not a number")):
        done = subprocess.run([sys.executable, str(REPO / "tools" / script), str(path),
                               "--markdown"], capture_output=True, text=True)
        assert done.returncode == 1, (script, done)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_plot_scripts_write_beside_the_csv_by_default_and_name_a_bad_out(tmp_path):
    data = tmp_path / "run" / "layer.csv"
    data.parent.mkdir()
    data.write_bytes(LAYER_SAMPLE.read_bytes())
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plot_layer.py"), str(data)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(tmp_path / "run" / "layer_1ranks_T128.png")]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    refused = subprocess.run([sys.executable, str(REPO / "tools" / "plot_perf.py"),
                              str(SAMPLE), "--out", str(blocker / "images")],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"cannot make the output folder {blocker / 'images'}" in refused.stderr
    refused = subprocess.run([sys.executable, str(REPO / "tools" / "plot_perf.py"),
                              str(SAMPLE), "--out", str(blocker)],
                             capture_output=True, text=True)
    assert refused.returncode == 1, refused.stderr
    assert f"--out {blocker} is a file, not a folder" in refused.stderr


def test_peers_scripts_refuse_bad_arguments_before_starting(tmp_path):
    peers = REPO / "benchmarks" / "peers"
    for script, flags, message in (
            ("bench_peers.py", ["--csv", str(tmp_path / "no" / "such" / "x.csv")],
             f"--csv {tmp_path / 'no' / 'such' / 'x.csv'}: cannot append to it"),
            ("profile_collective.py", ["--tokens", "0"], "--tokens must be >= 1, got 0"),
            ("profile_collective.py", ["--hidden", "-1"], "--hidden must be >= 1, got -1")):
        done = subprocess.run([sys.executable, str(peers / script), "--cpu", *flags],
                              capture_output=True, text=True, cwd=peers, timeout=120)
        assert done.returncode in (1, 2), (script, done)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_markdown_tables_give_ratios_to_plain_pytorch():
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_perf.py"), str(SAMPLE), "--markdown"],
        capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 x cpu (gloo)")
    torch_rows = [line for line in lines if "| torch a2a |" in line]
    assert torch_rows and all(line.count("| 1.00x |") == 2 for line in torch_rows)
    ours = next(line for line in lines if line.startswith("| 32 | hostfuse collective |"))
    # 1565.29 / 1177.02 and 1171.13 / 1293.47 from the sample.
    assert "| 1177.0 | 1.33x | 1293.5 | 0.91x | ok |" in ours


def test_markdown_shows_rows_without_a_check_as_such(tmp_path):
    # The NVLink floor (bench_nvlink_push --peers-csv) checks nothing: "-".
    data = tmp_path / "floor.csv"
    data.write_text(
        "date,device,ranks,tokens,hidden,topk,experts,row,phase,median_us,bytes,gbps,check\n"
        "d,gpu,2,128,7168,8,16,torch a2a,dispatch,100.0,1,1,ok\n"
        "d,gpu,2,128,7168,8,16,torch a2a,combine,100.0,1,1,mismatch\n"
        "d,gpu,2,128,7168,8,16,NVLink floor,dispatch,10.0,1,1,-\n"
        "d,gpu,2,128,7168,8,16,NVLink floor,combine,20.0,1,1,-\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_perf.py"), str(data), "--markdown"],
        capture_output=True, text=True, check=True)
    assert "| 128 | NVLink floor | 10.0 | 10.00x | 20.0 | 5.00x | - |" in done.stdout
    assert "| 128 | torch a2a | 100.0 | 1.00x | 100.0 | 1.00x | MISMATCH |" in done.stdout


def test_profile_script_counts_calls_on_cpu_ranks():
    output = run_ranks(2, REPO / "benchmarks" / "peers" / "profile_collective.py", "--cpu",
                       "--hidden", "64", "--tokens", "16")
    for name in ("hostfuse collective dispatch", "hostfuse collective combine",
                 "torch a2a dispatch", "torch a2a combine"):
        line = next((l for l in output.splitlines() if name + ":" in l), None)
        assert line is not None, output[-2000:]
        assert "ATen calls" in line and "host synchronizations" in line, line


def test_grouped_gemm_options_explains_itself_and_refuses_bad_sizes():
    script = REPO / "benchmarks" / "grouped_gemm_options.py"
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                           text=True, check=True)
    assert "--rows-per-group" in shown.stdout
    for flags, message in ((["--groups", "0"], "--groups must be >= 1, got 0"),
                           (["--rows-per-group", "128", "-3"], "--rows-per-group must be >= 1"),
                           (["--hidden", "7170"], "multiples of 8")):
        refused = subprocess.run([sys.executable, script, *flags], capture_output=True,
                                 text=True)
        assert refused.returncode == 2, refused
        assert message in refused.stderr, refused.stderr


LAYER_SAMPLE = REPO / "benchmarks" / "sample_layer.csv"


def test_layer_plot_script_makes_a_png_per_ranks_and_tokens(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_layer.py"), str(LAYER_SAMPLE),
         "--out", str(tmp_path), "--prefix", "sample"],
        capture_output=True, text=True, check=True)
    written = done.stdout.split()
    assert written == [str(tmp_path / "sample_1ranks_T128.png")]
    with open(written[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_layer_markdown_lists_every_stage_of_every_run_with_its_floor():
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_layer.py"), str(LAYER_SAMPLE),
         "--markdown"], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("1 x format sample (not a measurement), T = 128 per rank")
    # Runs in sorted order of their modes (epilogue before fusion); the
    # epilogue run has no activation stage; the replay comes last.
    assert "| grouped GEMM 1 (gate, up) | 140.0 | 150.0 | 118.0 |" in lines
    assert "| silu(gate) * up |  | 10.0 | 3.0 |" in lines
    table = [line for line in lines if line.startswith("| ")]
    assert table[-1] == "| **graph replay** | 265.0 | 280.0 | 187.0 |"


def test_layer_plot_script_names_missing_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("tokens,stage,time_us\n128,router,1.0\n")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plot_layer.py"), str(bad),
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "lacks the columns" in done.stderr
