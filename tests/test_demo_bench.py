"""python -m vidtok bench, beside demo on the command line: results go to an untracked folder in the
current directory unless --out names one, and the command says where it wrote them."""

import subprocess

from vidtok.__main__ import main


def test_bench_writes_to_an_untracked_folder_by_default(tmp_path, monkeypatch, capsys):
    runs = []

    def fake_run(cmd, **kwargs):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 0
    json_arg = next(a for a in runs[0] if a.startswith("--benchmark-json="))
    json_path = json_arg.split("=", 1)[1]
    assert json_path.startswith(str(tmp_path / "vidtok-bench") + "/") and "bench/results" not in json_path
    assert runs[1][-1] == json_path  # rendered where it was written
    assert f"wrote {json_path}" in capsys.readouterr().out
    (tmp_path / "afile").write_text("")
    assert main(["bench", "--quick", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
