from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from wanserve.cli import build_parser, settings_from_args
from wanserve.config import Settings


def test_env_then_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANSERVE_MODEL", "/models/wan")
    monkeypatch.setenv("WANSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("WANSERVE_VIDEO_CRF", "23")
    args = build_parser().parse_args(["generate", "p", "--device", "cpu"])
    s = settings_from_args(args)
    assert (s.model, s.device, s.cache_dir, s.video_crf) == ("/models/wan", "cpu", tmp_path, 23)
    args = build_parser().parse_args(["generate", "p", "--model", "tiny"])
    assert settings_from_args(args).model == "tiny"  # a flag beats the environment


def test_defaults_work_on_a_laptop(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANSERVE_MODEL", "WANSERVE_DEVICE", "WANSERVE_DTYPE"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert (s.model, s.device, s.dtype) == ("tiny", "auto", "auto")


def test_bad_env_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANSERVE_VIDEO_CRF", "99")
    with pytest.raises(ValidationError, match="video_crf"):
        Settings()


def test_a_misspelt_x264_preset_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not at the first encode, after a whole generation."""
    monkeypatch.setenv("WANSERVE_VIDEO_PRESET", "ultrafastx")
    with pytest.raises(ValidationError, match="video_preset"):
        Settings()
    monkeypatch.setenv("WANSERVE_VIDEO_PRESET", "slow")
    assert Settings().video_preset == "slow"


def test_cli_reports_bad_settings_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from wanserve.cli import main

    monkeypatch.setenv("WANSERVE_VIDEO_CRF", "99")
    assert main(["generate", "p"]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "video_crf" in err and "Traceback" not in err


def test_cfg_parallel_on_needs_two_halves_of_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANSERVE_GPUS", "0,1,2")
    monkeypatch.setenv("WANSERVE_CFG_PARALLEL", "on")
    with pytest.raises(ValidationError, match="3 GPUs cannot be"):
        Settings()
    args = build_parser().parse_args(["worker", "--cfg-parallel", "off"])
    assert settings_from_args(args).cfg_parallel == "off"  # the flag, over the environment
    monkeypatch.setenv("WANSERVE_GPUS", "0,1,2,3")
    assert Settings().cfg_parallel == "on"


def test_the_public_url_must_be_an_absolute_http_url() -> None:
    """Every URL handed out starts with it: `notaurl` made each status and video URL useless."""
    for bad in ("notaurl", "video.example.com", "ftp://video.example.com", "https://", "https://h/?x=1", "http://h:x"):
        with pytest.raises(ValidationError, match="absolute http"):
            Settings(public_url=bad)
    assert (
        Settings(public_url="https://video.example.com/wan/").resolved_public_url() == "https://video.example.com/wan"
    )
    assert Settings(public_url="").public_url is None
    for good in ("http://gpu-box:8000", "http://[::1]:8000/", "https://video.example.com/wan"):
        assert Settings(public_url=good).public_url == good


@pytest.mark.parametrize("name", ["data_dir", "keys_dir", "cache_dir", "lora_cache_dir", "safety_terms_file"])
def test_an_empty_path_variable_is_refused_not_the_current_folder(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`WANSERVE_KEYS_DIR=` would otherwise be Path(""): the server's keys written into whatever folder it started
    in."""
    from wanserve.cli import main

    monkeypatch.setenv(f"WANSERVE_{name.upper()}", " ")
    with pytest.raises(ValidationError, match=f"{name}[\\s\\S]*is empty"):
        Settings()
    assert main(["serve", "--no-worker"]) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_a_relative_sqlite_path_is_under_the_data_dir_and_four_slashes_are_absolute(tmp_path: Path) -> None:
    """An API and a worker started from different folders must share one database: a relative path is not the
    current folder's. `sqlite:////abs` is absolute, as SQLAlchemy reads it."""
    from wanserve.backends import open_job_store

    data = tmp_path / "data"
    relative = open_job_store(Settings(data_dir=data, store="sqlite:///queue/jobs.db"))
    absolute = open_job_store(Settings(data_dir=data, store=f"sqlite:///{tmp_path}/elsewhere.db"))
    try:
        assert (data / "queue" / "jobs.db").exists() and (tmp_path / "elsewhere.db").exists()
    finally:
        relative.close()
        absolute.close()


def test_one_gpu_is_the_workers_device_and_one_it_cannot_use_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--gpus 3` was ignored (the worker ran on the default device while reporting GPU 3)."""
    import torch

    from wanserve.cli import main

    assert Settings(gpus=[3]).device == "cuda:3" and Settings(gpus=[3], device="cuda").device == "cuda:3"
    assert Settings(gpus=[0, 1]).device == "auto"
    with pytest.raises(ValidationError, match="gpus=3 and device=cuda:1 name different devices"):
        Settings(gpus=[3], device="cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WANSERVE_WORKER_SETTINGS", raising=False)  # not a worker started by `serve`
    assert main(["worker", "--gpus", "3", "--data-dir", str(tmp_path), "--public-url", "http://127.0.0.1:1"]) == 78
    assert "device cuda:3 was asked for (--device or --gpus), but torch sees no CUDA GPU" in capsys.readouterr().err
    # A group fails the same way before any rank starts: without CUDA (it ran as CPU processes), or naming a GPU
    # the machine lacks.
    assert main(["worker", "--gpus", "0,1", "--data-dir", str(tmp_path), "--public-url", "http://127.0.0.1:1"]) == 78
    assert "device cuda:0 was asked for (--device or --gpus), but torch sees no CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["worker", "--gpus", "0,5", "--data-dir", str(tmp_path), "--public-url", "http://127.0.0.1:1"]) == 78
    assert capsys.readouterr().err == (
        "error: device cuda:5 was asked for (--device or --gpus), but this machine has 2 GPU(s)\n"
    )


def test_a_redis_url_whose_port_does_not_parse_is_a_clear_error_that_hides_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from wanserve.cli import main

    assert main(["serve", "--store", "redis://:pwSECRET@127.0.0.1:abc/0", "--no-worker"]) == 2
    err = capsys.readouterr().err
    assert "store: Value error, the Redis URL's port is not a number" in err
    assert "pwSECRET" not in err and "Traceback" not in err


def test_a_data_dir_that_cannot_be_used_is_named_and_nothing_is_written_before_the_address_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wanserve.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["serve", "--data-dir", str(a_file), "--no-worker"]) == 1
    assert "the data folder" in (err := capsys.readouterr().err) and "(--data-dir, WANSERVE_DATA_DIR)" in err
    data = tmp_path / "data"
    assert main(["serve", "--host", "nosuchhost.invalid", "--data-dir", str(data), "--no-worker"]) == 1
    assert "cannot listen on nosuchhost.invalid" in capsys.readouterr().err
    assert not (data / "api-key").exists()  # a key for a server that never ran


def test_a_database_left_where_a_relative_sqlite_path_used_to_point_is_not_silently_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, sqlite:///jobs.db was the current folder's file: after the upgrade it would be a new, empty one under
    the data dir, its queued jobs left behind. The start is refused, naming the four-slash form."""
    from wanserve.backends import open_job_store

    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.db").write_bytes(b"")
    with pytest.raises(OSError, match=f"name it sqlite:///{tmp_path}/old.db"):
        open_job_store(Settings(data_dir=tmp_path / "data", store="sqlite:///old.db"))
    assert not (tmp_path / "data" / "old.db").exists()
