"""fio's output read back (`vdev.bench.fio`), on output the real fio wrote.

``tests/data/fio/`` holds what fio 3.33 wrote on the host running
``benchmarks/guest_compare_blk.fio`` (the guest benchmark's job file) against
a file, for a read-only job and a mixed read/write one:

    DISK=disk.img RUNTIME=1 RAMP=0 LOGS=logs fio benchmarks/guest_compare_blk.fio \\
        --section=randread-4k-qd1 --output-format=json --output=logs/randread-4k-qd1.json
    (the same with --section=randrw-4k-qd8; the histogram logs gzipped)

The checks: fio's JSON figures come through unchanged; every percentile fio
printed is one of the bin values `fio_bin_value` computes (so the bin
geometry is fio's); the histogram log adds up line by line into the run's
histogram and intervals, whose maxima are the latency log's; the files
written from it (result.json, the HdrHistogram log, the pictures) decode to
the same counts and percentiles; broken input is refused naming the line.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hdrh.log import HistogramLogReader

from vdev.bench.fio import (
    FIO_PLAT_NR,
    PACK_BEGIN,
    PACK_END,
    FioError,
    fio_bin_value,
    fio_run,
    guest_pack_command,
    parse_fio_json,
    parse_hist_log,
    parse_lat_log,
    run_document,
    unpack_guest_output,
    write_run_files,
)
from vdev.bench.report import plot_over_time, plot_percentiles

DATA = Path(__file__).parent.parent / "data" / "fio"
REPO = Path(__file__).parent.parent.parent


def guest_compare() -> ModuleType:
    """benchmarks/guest_compare_blk.py, whose ``from backends import …`` means
    benchmarks/backends.py (not the project's backends package)."""
    bench = REPO / "benchmarks"
    saved_path, saved_mod = list(sys.path), sys.modules.get("backends")
    try:
        spec = importlib.util.spec_from_file_location("backends", bench / "backends.py")
        assert spec and spec.loader
        helpers = importlib.util.module_from_spec(spec)
        sys.modules["backends"] = helpers        # before running it: its dataclasses look it up
        spec.loader.exec_module(helpers)
        spec = importlib.util.spec_from_file_location("guest_compare_blk", bench / "guest_compare_blk.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path[:] = saved_path
        if saved_mod is not None:
            sys.modules["backends"] = saved_mod
        else:
            sys.modules.pop("backends", None)


def load(name: str) -> tuple[dict, str, str]:
    doc = parse_fio_json((DATA / f"{name}.json").read_text())
    hist = gzip.decompress((DATA / f"{name}_clat_hist.log.gz").read_bytes()).decode()
    lat = (DATA / f"{name}_clat.log").read_text()
    return doc, hist, lat


def test_fio_bin_values_are_the_ones_fio_reports() -> None:
    assert [fio_bin_value(i) for i in (0, 1, 127)] == [0, 1, 127]
    assert fio_bin_value(128) == 129 and fio_bin_value(191) == 255 and fio_bin_value(192) == 258
    values = [fio_bin_value(i) for i in range(FIO_PLAT_NR)]
    assert values == sorted(values) and len(set(values)) == FIO_PLAT_NR
    known = set(values)
    for name in ("randread-4k-qd1", "randrw-4k-qd8"):
        doc, _, _ = load(name)
        for d in ("read", "write"):
            for v in doc["jobs"][0][d]["clat_ns"].get("percentile", {}).values():
                assert v in known, (name, d, v)
    with pytest.raises(FioError, match="1856"):
        fio_bin_value(FIO_PLAT_NR)


def test_json_figures_come_through_unchanged() -> None:
    raw = (DATA / "randrw-4k-qd8.json").read_text()
    doc = parse_fio_json("fio: a warning fio printed first\n" + raw + "\ntrailing text\n")
    assert doc == json.loads(raw)
    job = doc["jobs"][0]
    run = fio_run("host", job, *load("randrw-4k-qd8")[1:])
    assert [d.direction for d in run.directions] == ["read", "write"]
    for d in run.directions:
        src = job[d.direction]
        assert d.ios == src["total_ios"] and d.iops == src["iops"] and d.bw_bytes == src["bw_bytes"]
        lat = d.latency_us()
        clat = src["clat_ns"]
        assert lat["max"] == round(clat["max"] / 1000, 3)
        for key, p in (("p50", "50.000000"), ("p99", "99.000000"), ("p99.9", "99.900000")):
            assert lat[key] == round(min(clat["percentile"][p], clat["max"]) / 1000, 3)
    assert run.requests == job["read"]["total_ios"] + job["write"]["total_ios"]
    assert run.main.direction == max(run.directions, key=lambda d: d.ios).direction
    with pytest.raises(FioError, match="no fio JSON"):
        parse_fio_json("fio: error: no such file\n{not json")


@pytest.mark.parametrize("name", ["randread-4k-qd1", "randrw-4k-qd8"])
def test_histogram_log_adds_up(name: str) -> None:
    doc, hist_text, lat_text = load(name)
    job = doc["jobs"][0]
    rows = parse_hist_log(hist_text)
    lat_rows = parse_lat_log(lat_text)
    run = fio_run("host", job, hist_text, lat_text)
    logged = sum(sum(c) for _t, _d, c in rows)
    assert run.histogram.total == logged == sum(iv.count for iv in run.intervals)
    # fio logs no line for the last partial 100 ms: a few requests fewer than the JSON
    assert 0.8 * run.requests <= logged <= run.requests
    assert len(run.intervals) == len({t for t, _d, _c in rows})
    for iv in run.intervals:
        assert iv.end - iv.start == pytest.approx(0.1, abs=0.02)
        if iv.count:
            exact = [v for t, v, _d in lat_rows if iv.start * 1000 < t <= iv.end * 1000 + 1]
            assert iv.max_ns == max(exact)
            assert iv.percentile(50) <= iv.percentile(99) <= iv.max_ns
    # the whole run's extremes are fio's own; percentiles from the log are fio's within
    # fio's bin width (1.6 %) plus ours (0.8 %), or one bin when the few unlogged
    # requests move the rank
    main = run.main
    assert run.histogram.max_ns == max(d.max_ns for d in run.directions)
    if len(run.directions) == 1:
        for p in (50.0, 90.0, 99.0):
            ours = run.histogram.percentile(p)
            assert ours == pytest.approx(main.percentiles_ns[p], rel=0.05), p


def test_files_decode_to_the_same_counts_and_percentiles(tmp_path: Path) -> None:
    doc, hist_text, lat_text = load("randread-4k-qd1")
    run = fio_run("host", doc["jobs"][0], hist_text, lat_text)
    rdoc = run_document(run, workload={"job": "randread-4k-qd1"}, target={"disk": "file"},
                        guest={"kernel": "host"}, fio_version=doc["fio version"])
    written = write_run_files(run, str(tmp_path), rdoc, start_unix=1.7e9)
    assert sorted(Path(p).name for p in written) == ["latency.hgrm", "latency.hlog", "result.json"]
    back = json.loads((tmp_path / "result.json").read_text())
    assert back["result"]["requests"] == run.requests
    assert back["result"]["requests_in_hist_log"] == run.histogram.total
    assert back["result"]["latency_us"]["p50"] == run.main.latency_us()["p50"]
    assert back["fio_version"] == "fio-3.33"

    reader = HistogramLogReader(str(tmp_path / "latency.hlog"), None)
    total, lines = None, 0
    try:
        while (h := reader.get_next_interval_histogram()) is not None:
            lines += 1
            total = h if total is None else (total.add(h) or total)
    finally:
        reader.close()      # else its file stays open until collected (fd-counting tests notice)
    assert total is not None and lines == sum(1 for iv in run.intervals if iv.count)
    assert total.get_total_count() == run.histogram.total
    # the same percentiles within one of our buckets (0.8 %): each interval of the log
    # is clamped to its own exact max, the whole run only to the run's
    for p in (50.0, 99.0, 99.9):
        assert total.get_value_at_percentile(p) == pytest.approx(run.histogram.percentile(p), rel=0.009)

    series = [run.series()]
    for name, plot in (("p.png", plot_percentiles), ("t.png", plot_over_time)):
        plot(series, str(tmp_path / name), "fio on the host")
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_broken_logs_are_refused_naming_the_line() -> None:
    _, hist_text, _ = load("randread-4k-qd1")
    lines = hist_text.splitlines()
    with pytest.raises(FioError, match="line 3: not comma-separated"):
        parse_hist_log("\n".join([lines[0], lines[1], "100, 0, 4096, x"]))
    with pytest.raises(FioError, match="line 1: 5 bins"):
        parse_hist_log("100, 0, 4096, 1, 2, 3, 4, 5")
    with pytest.raises(FioError, match="line 1: 2 fields"):
        parse_lat_log("100, 5")
    # a coarser log (bins merged 2^N at a time) is read onto fio's bins
    coarse = parse_hist_log("100, 0, 4096, " + ", ".join(["0"] * 927 + ["7"]))
    assert coarse[0][2][FIO_PLAT_NR - 2] == 7 and sum(coarse[0][2]) == 7


def test_guest_script_and_output_round_trip(tmp_path: Path) -> None:
    gc = guest_compare()
    job_file = (REPO / "benchmarks" / "guest_compare_blk.fio").read_text()
    assert gc.job_sections(job_file) == ["randread-4k-qd1", "randread-4k-qd16", "randwrite-4k-qd16",
                                         "randrw-4k-qd8"]
    script = gc.guest_script(["randread-4k-qd1", "randread-4k-qd16"], 2, 1)
    # the disks alternate: vdev first, then qsd first
    runs = [line for line in script.splitlines() if line.startswith("DISK=")]
    assert [r.split()[0] for r in runs] == ["DISK=$VDEV", "DISK=$QSD", "DISK=$QSD", "DISK=$VDEV"]
    assert all("--section=" in r and "--output-format=json" in r for r in runs)
    # what the guest prints (busybox tar -cz | busybox base64, between markers) unpacks
    src = tmp_path / "src"
    (src / "vdev").mkdir(parents=True)
    (src / "vdev" / "x.json").write_text('{"jobs": []}' + " " * 5000)
    busybox = "/bin/busybox"
    if not Path(busybox).exists():
        pytest.skip("busybox-static is not installed")
    packed = subprocess.run(f"{busybox} tar -cz -C {src} . | {busybox} base64", shell=True, check=True,
                            capture_output=True, text=True).stdout
    console = f"fio: ...\n{PACK_BEGIN}\n{packed}{PACK_END}\n"
    unpack_guest_output(console, str(tmp_path / "dst"))
    assert gc.guest_script(["randread-4k-qd1"], 1, 0).rstrip().endswith(guest_pack_command("/tmp/out"))
    assert (tmp_path / "dst" / "vdev" / "x.json").read_text() == '{"jobs": []}' + " " * 5000
