"""`atomic.replacing_dir`, the one way a folder is replaced (the site, the synthetic dataset): each call builds in a
folder of its own (process id and a random part), so two overlapping runs, even two threads of one process, neither
write into nor remove each other's folder, and the target ends as one run's whole tree, never a mix."""
from __future__ import annotations

import threading

from ssl_segbench.atomic import replacing_dir


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_overlapping_replacements_both_complete_without_clobbering(tmp_path):
    target = tmp_path / "out"
    (target / "stale.txt").parent.mkdir()
    (target / "stale.txt").write_bytes(b"old")
    both_inside, temps, errors = threading.Barrier(2, timeout=30), {}, []
    trees = {who: {f"{who}/{i}.txt": f"{who} {i}".encode() for i in range(20)} | {"who": who.encode()}
             for who in ("a", "b")}

    def replace(who):
        try:
            with replacing_dir(target) as tmp:
                temps[who] = tmp
                both_inside.wait()  # the other run has made its folder and cleared leftovers: ours must survive
                for rel, data in trees[who].items():
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).write_bytes(data)
                both_inside.wait()  # both trees are whole before either is swapped in
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=replace, args=(who,)) for who in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert temps["a"] != temps["b"] and temps["a"].parent == temps["b"].parent == tmp_path
    assert all("out.tmp-" in t.name for t in temps.values())
    final = _tree(target)
    assert final in (trees["a"], trees["b"])  # one run's whole tree: no stale file, no file of the other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # both temporary folders and the old tree gone


def test_a_failed_body_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"kept")
    try:
        with replacing_dir(target) as tmp:
            (tmp / "new.txt").write_bytes(b"new")
            raise RuntimeError("build failed")
    except RuntimeError:
        pass
    assert _tree(target) == {"keep.txt": b"kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
