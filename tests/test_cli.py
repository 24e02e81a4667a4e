"""The command line end to end on a small synthetic set: records, skip policy, determinism, leaderboard, errors."""
from __future__ import annotations

import pytest

from ssl_segbench.cli import main
from ssl_segbench.records import iter_records


def _run(tmp_path, data, *extra):
    protocols = extra[extra.index("--protocol") + 1] if "--protocol" in extra else "kmeans,linear"
    quick = ["--param", "linear.epochs=3"] if "linear" in protocols else []
    return main(["run", "--backbone", "pixels", "--dataset", "synthetic", "--data-root", str(data),
                 "--size", "64", "--results-dir", str(tmp_path / "res"), *quick, *extra])


def test_run_writes_records_then_skips_and_leaderboard_renders(small_synthetic, tmp_path, capsys):
    assert _run(tmp_path, small_synthetic) == 0
    recs = [r for _, r in iter_records(tmp_path / "res")]
    assert sorted(r.protocol["name"] for r in recs) == ["kmeans", "linear"]
    km = next(r for r in recs if r.protocol["name"] == "kmeans")
    assert len(km.metrics["miou"]["per_seed"]) == 5 and km.seeds == [0, 1, 2, 3, 4]
    assert km.dataset["n_images"] == 8 and len(km.dataset["content_sha256"]) == 64
    assert km.transform == {"policy": "shorter", "size": 64, "patch_size": 16}
    prov = km.provenance
    assert {"packages", "git_sha", "device", "wall_seconds", "cache_hit", "started"} <= set(prov)
    assert prov["packages"]["torch"] and prov["device"] == "cpu"
    lin = next(r for r in recs if r.protocol["name"] == "linear")
    assert lin.info["train_split"] == "train" and lin.provenance["cache_hit"] is False
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "res").rglob("*.json")}
    capsys.readouterr()
    assert _run(tmp_path, small_synthetic) == 0
    assert "skipped" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "res").rglob("*.json")} == stamps
    out = tmp_path / "lb"
    assert main(["leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(out)]) == 0
    text = (out / "synthetic.md").read_text()
    assert "do not edit" in text and "pixels @ builtin" in text and "K=8" in text and "Synthetic demo" in text
    first = text
    assert main(["leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(out)]) == 0
    assert (out / "synthetic.md").read_text() == first


def test_same_seed_gives_identical_records(small_synthetic, tmp_path):
    assert _run(tmp_path / "a", small_synthetic, "--backbone", "random_vits16", "--seeds", "2") == 0
    assert _run(tmp_path / "b", small_synthetic, "--backbone", "random_vits16", "--seeds", "2") == 0
    a = {r.protocol["name"]: r.per_seed for _, r in iter_records(tmp_path / "a" / "res")}
    b = {r.protocol["name"]: r.per_seed for _, r in iter_records(tmp_path / "b" / "res")}
    assert a == b and set(a) == {"kmeans", "linear"}


def test_unknown_names_list_the_known_ones(small_synthetic, tmp_path, capsys):
    assert _run(tmp_path, small_synthetic, "--backbone", "dino_vitz") == 2
    err = capsys.readouterr().err
    assert "Did you mean 'dino_vits8'" in err and "`ssl-segbench list backbones`" in err and "dino_vitb16" not in err
    assert main(["run", "--backbone", "pixels", "--dataset", "nope"]) == 2
    assert "Known:" in capsys.readouterr().err
    assert _run(tmp_path, small_synthetic, "--protocol", "kmeanz") == 2
    assert "Known: datus, fs4, kmeans, leopart-cd, linear" in capsys.readouterr().err


def test_missing_data_root_shows_expected_layout(tmp_path, capsys):
    assert main(["run", "--backbone", "pixels", "--dataset", "suim", "--data-root", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "train_val/images" in err


def test_offline_backbone_not_in_cache_message(small_synthetic, tmp_path, capsys):
    assert _run(tmp_path, small_synthetic, "--backbone", "dino_vits16") == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err.replace("\n", " ")


def test_list_commands(capsys):
    for what in ("backbones", "datasets", "protocols"):
        assert main(["list", what]) == 0
    out = capsys.readouterr().out
    assert "dinov2_vits14" in out and "synthetic" in out and "kmeans" in out


def test_corrupt_record_is_reported_not_dropped(small_synthetic, tmp_path, capsys):
    assert _run(tmp_path, small_synthetic, "--protocol", "kmeans", "--seeds", "1") == 0
    (tmp_path / "res" / "synthetic" / "bad.json").write_text("{not json")
    assert main(["leaderboard", "--results-dir", str(tmp_path / "res"), "--out", str(tmp_path / "lb")]) == 1
    assert "bad.json" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["--seeds=x", "--param=kmeans"])
def test_bad_arguments_exit_nonzero(bad):
    with pytest.raises(SystemExit) as e:
        main(["run", "--backbone", "pixels", "--dataset", "synthetic", bad])
    assert e.value.code == 2


def test_crf_flag_sets_the_parameter_or_names_protocols_without_crf(small_synthetic, tmp_path, capsys):
    from ssl_segbench.protocols import PROTOCOLS

    # no registered protocol is left without a CRF step (datus and leopart-cd were the last; see the last test)
    assert [name for name, cls in PROTOCOLS.items() if "crf" not in cls.all_defaults()] == []
    pytest.importorskip("pydensecrf.densecrf")
    assert _run(tmp_path, small_synthetic, "--protocol", "kmeans", "--seeds", "1", "--crf") == 0
    (_, rec), = iter_records(tmp_path / "res")
    assert rec.protocol["params"]["crf"] is True and rec.info["crf"]["images_refined"] == 8
    assert "CRF" in rec.setting.column.label


def test_records_carry_per_image_stats_that_reproduce_the_scores(small_synthetic, tmp_path):
    from ssl_segbench.metrics import scores_from_stats
    from ssl_segbench.records import decode_array

    assert _run(tmp_path, small_synthetic, "--seeds", "3") == 0
    for _, rec in iter_records(tmp_path / "res"):
        stats = decode_array(rec.image_stats)
        assert stats.shape == (3, 8, 8, 3)
        for seed, s in enumerate(rec.per_seed):
            again = scores_from_stats(stats[seed].sum(0))
            assert again["miou"] == pytest.approx(s["miou"]) and again["pixel_acc"] == pytest.approx(s["pixel_acc"])
        lo, hi = rec.metrics["miou"]["ci95"]
        assert lo <= rec.metrics["miou"]["mean"] <= hi


def test_crf_flag_runs_datus_and_records_it(small_synthetic, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    assert main(["run", "--backbone", "random_vits16", "--dataset", "synthetic", "--data-root", str(small_synthetic),
                 "--size", "64", "--protocol", "datus", "--param", "datus.k=4", "--seeds", "1", "--crf",
                 "--results-dir", str(tmp_path / "res")]) == 0
    (_, rec), = iter_records(tmp_path / "res")
    assert rec.protocol["params"]["crf"] is True and rec.info["crf"]["images_refined"] == 8
    assert "ci95" in rec.metrics["miou"]  # per-image stats reached the record


def test_the_main_command_finds_data_where_a_user_puts_it(small_synthetic, tmp_path, monkeypatch, capsys):
    """`run --backbone B --dataset suim` without --data-root reads $SSL_SEGBENCH_DATA/suim; a missing dataset is
    reported before any backbone is resolved (an unknown backbone would otherwise be the first error)."""
    import shutil

    monkeypatch.setenv("SSL_SEGBENCH_DATA", str(tmp_path / "data"))
    assert main(["run", "--backbone", "no_such_backbone", "--dataset", "suim"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path / 'data' / 'suim'} does not exist" in err and "SSL_SEGBENCH_DATA" in err
    shutil.copytree(small_synthetic, tmp_path / "data" / "suim")
    assert main(["run", "--backbone", "pixels", "--dataset", "suim", "--size", "64", "--protocol", "kmeans",
                 "--seeds", "1", "--results-dir", str(tmp_path / "res")]) == 0
    (_, rec), = iter_records(tmp_path / "res")
    assert rec.dataset["root"] == str(tmp_path / "data" / "suim")


def test_help_texts_do_not_print_empty_defaults(capsys):
    for command in ("run", "show", "check", "leaderboard"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    text = capsys.readouterr().out
    assert "--skip-bad" in text and "--option" in text and "--crf" in text  # show shares run's options
