"""`deparrow job run --file ... --outputs DIR` and `deparrow job outputs` as a person types
them: a real hub, a real node on wasmtime, the wordfreq program reading the uploaded files
under /inputs, and what it wrote downloaded into a folder, byte for byte what it must be."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import wasm_jobs
from deparrow.localnet import Proc, wait_for
from tests.conftest import start_hub

DATA = Path(wasm_jobs.__file__).parent / "data" / "wordfreq"
EXPECTED = {p.name: p.read_bytes() for p in sorted((DATA / "expected").iterdir())}


def cli(
    hub_url: str, token: str, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    root = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "deparrow.cli", "--hub", hub_url, "--token", token, *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, env=env,
    )  # fmt: skip


def files_in(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_a_file_job_from_the_command_line(tmp_path: Path, mosquitto: str) -> None:
    hub = start_hub(tmp_path, mqtt_url=mosquitto)
    node = None
    try:
        _, owner = hub.user("owner")
        alice_user, _ = hub.user("alice")
        token = alice_user["token"]
        prefs = tmp_path / "prefs.json"
        prefs.write_text(json.dumps({"wasm_engine": "wasmtime"}))  # pywasm3 takes no files
        cmd = [sys.executable, "-m", "edge.cli", "--hub", hub.url, "--token",
               owner.enrollment_token()["token"], "--name", "n", "--data-dir",
               str(tmp_path / "node"), "--config", str(prefs), "-v"]  # fmt: skip
        node = Proc("n", cmd, tmp_path / "node.log")
        wait_for("the node", lambda: any(n["state"] == "idle" for n in owner.nodes()), 60, [node])

        # a file and a folder of files (wordfreq walks /inputs, subfolders too)
        out = tmp_path / "out"
        run = cli(hub.url, token, "job", "run", "example:wordfreq",
                  "--file", str(DATA / "inputs" / "README.txt"),
                  "--file", str(DATA / "inputs" / "carroll"), "--outputs", str(out))  # fmt: skip
        assert run.returncode == 0, (run.stdout, run.stderr, node.tail())
        lines = run.stdout.splitlines()
        job_id = lines[0].split()[1]
        assert "  outputs: 2 files, 2112 bytes" in lines
        assert "    counts.tsv  2053 bytes" in lines and "    summary.json  59 bytes" in lines
        assert lines[-3:] == [
            "saved counts.tsv  2053 bytes",
            "saved summary.json  59 bytes",
            f"2 files, 2112 bytes, saved in {out}",
        ]
        assert files_in(out) == EXPECTED
        spec = json.loads(cli(hub.url, token, "job", "get", job_id, "--json").stdout)["spec"]
        assert [f["path"] for f in spec["inputs"]] == [
            "README.txt", "carroll/jabberwocky.txt", "carroll/rabbit-hole.txt"
        ]  # fmt: skip

        # the same outputs again, into a folder of subfolders that does not exist yet
        again = tmp_path / "a" / "b"
        got = cli(hub.url, token, "job", "outputs", job_id, str(again))
        assert got.returncode == 0, got.stderr
        assert got.stdout.splitlines()[-1] == f"2 files, 2112 bytes, saved in {again}"
        assert files_in(again) == EXPECTED
        got = cli(hub.url, token, "job", "outputs", job_id, str(again), "--json")
        assert json.loads(got.stdout) == {"job": job_id, "dir": str(again), "files": [
            {"path": "counts.tsv", "size": 2053}, {"path": "summary.json", "size": 59}
        ]}  # fmt: skip

        # a symlink in the folder that would send an output elsewhere: refused, nothing written
        trap = tmp_path / "trap"
        trap.mkdir()
        elsewhere = tmp_path / "elsewhere.txt"
        elsewhere.write_text("mine")
        (trap / "counts.tsv").symlink_to(elsewhere)
        got = cli(hub.url, token, "job", "outputs", job_id, str(trap))
        assert got.returncode == 1 and elsewhere.read_text() == "mine"
        assert got.stderr == (
            f"deparrow: output 'counts.tsv' refused: it would be written outside {trap}: "
            "not saved\n"
        ), got.stderr

        # a folder given as '.': its files at /inputs itself; a large file shows its upload
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3 * 1024 * 1024))
        submitted = cli(hub.url, token, "job", "run", str(wasm_jobs.path("loop.wasm")),
                        "--file", f"{DATA / 'inputs'}=.", "--file", f"{big}=data/big.bin",
                        "--timeout", "30", "--json")  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        assert submitted.stderr.splitlines() == [
            "uploading data/big.bin: 3.0 MiB", "uploaded data/big.bin: 3.0 MiB"
        ]  # fmt: skip
        looping = json.loads(submitted.stdout)["id"]
        spec = json.loads(cli(hub.url, token, "job", "get", looping, "--json").stdout)["spec"]
        assert [f["path"] for f in spec["inputs"]] == [
            "README.txt", "carroll/jabberwocky.txt", "carroll/rabbit-hole.txt", "data/big.bin"
        ]  # fmt: skip
        got = cli(hub.url, token, "job", "outputs", looping, str(tmp_path / "none"))
        assert got.returncode == 1, got.stderr
        assert got.stderr.startswith(f"deparrow: job {looping} is ")
        assert "its outputs can be downloaded once it has finished" in got.stderr
        cli(hub.url, token, "job", "cancel", looping)
        got = cli(hub.url, token, "job", "outputs", looping, str(tmp_path / "none"))
        assert (got.returncode, got.stderr) == (
            1, f"deparrow: job {looping} cancelled: cancelled by its owner; it left no outputs\n"
        )  # fmt: skip
        assert not (tmp_path / "none").exists()

        # a job that is not a file job
        plain = cli(hub.url, token, "job", "run", "example:fib", "--invoke", "fib", "--json",
                    "--", "10")  # fmt: skip
        fib = json.loads(plain.stdout)["id"]
        got = cli(hub.url, token, "job", "outputs", fib, str(tmp_path / "none"))
        assert got.returncode == 1 and got.stderr.startswith(
            f"deparrow: job {fib} is not a file job, so it has no outputs"
        ), got.stderr

        # an https:// input goes to the hub as it is: the hub fetches it (public hosts only)
        url = "https://127.0.0.1:1/words.txt"
        got = cli(hub.url, token, "job", "run", "example:wordfreq", "--file", url, "--outputs",
                  str(tmp_path / "u"))  # fmt: skip
        assert (got.returncode, got.stderr) == (1, (
            f"deparrow: inputs[0].ref: {url}: the address 127.0.0.1 is loopback (the hub "
            "fetches public addresses only)\n"
        )), got.stderr  # fmt: skip

        # past the hub's retention (as hub/market/retention.py leaves a job): 410, said so
        with sqlite3.connect(tmp_path / "hub" / "hub.sqlite") as db:
            db.execute("DELETE FROM job_files WHERE job = ?", (job_id,))
            db.execute("UPDATE jobs SET outputs_expired_at = ? WHERE id = ?", (time.time(), job_id))
        shown = cli(hub.url, token, "job", "get", job_id).stdout
        assert "  outputs: 2 files, 2112 bytes (expired: the hub keeps them no more)" in shown
        got = cli(hub.url, token, "job", "outputs", job_id, str(tmp_path / "late"))
        assert got.returncode == 1
        assert got.stderr == (
            f"deparrow: the outputs of job {job_id} expired (kept 604800s after it ended); "
            "run the job again to make them anew\n"
        ), got.stderr
    finally:
        if node is not None:
            node.stop()
        hub.stop()


def test_file_problems_are_said_before_anything_is_sent(tmp_path: Path) -> None:
    """No hub at all: every one of these is refused before a byte goes anywhere."""
    (tmp_path / "README.txt").write_text("words")
    (tmp_path / "out.txt").write_text("a file")
    nowhere = "http://127.0.0.1:9"
    for args, code, message in [
        (("--file", "README.txt=../up.txt"), 2, "Invalid value for --file: README.txt=../up.txt: "
         "file path '../up.txt' must be relative, without '.', '..' or '//'"),
        (("--file", "README.txt=a b.txt"), 2, "Invalid value for --file: README.txt=a b.txt: the "
         "file name 'a b.txt' may have only letters, digits and . _ - + @ = , (and / between "
         "folders); give another NAME as PATH=NAME"),
        (("--file", "nope.txt"), 66, "Invalid value for --file: cannot read nope.txt: No such "
         "file or directory"),
        (("--file", "README.txt", "--file", "README.txt"), 2, "Invalid value for --file: two "
         "files would be /inputs/README.txt; give one another NAME"),
        (("--file", "sha256:" + "0" * 64), 2, f"Invalid value for --file: sha256:{'0' * 64}: "
         f"give the name the job sees it by, as sha256:{'0' * 64}=NAME"),
        (("--outputs", "out.txt"), 2, "--outputs: out.txt is not a directory"),
    ]:  # fmt: skip
        out = cli(nowhere, "dpt_x", "job", "run", "example:wordfreq", *args, cwd=tmp_path)
        assert (out.returncode, out.stderr) == (code, f"deparrow: {message}\n"), args


def test_the_file_name_rule_is_the_hubs() -> None:
    from edge.cli_files import FILE_NAME_PATTERN
    from hub.market.spec import FILE_PATH_PATTERN

    assert FILE_NAME_PATTERN == FILE_PATH_PATTERN
