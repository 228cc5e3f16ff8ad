import json

import pytest

from serve.keys import KEY_PREFIX, KeyRing, create_key, hash_key, main, read_keys_file, revoke_key


def test_create_stores_only_the_hash(tmp_path):
    path = tmp_path / "keys.json"
    key = create_key(path, "alice")
    text = path.read_text()
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    assert key not in text and hash_key(key) in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [e.tenant for e in read_keys_file(path)] == ["alice"]


def test_keyring_maps_keys_to_tenants_and_rereads(tmp_path):
    path = tmp_path / "keys.json"
    a = create_key(path, "alice")
    ring = KeyRing(path, recheck_s=0)
    assert ring.tenant(a) == "alice"
    for bad in (None, "", "yk-nope", a + "x", a[:-1], "x" * 500):
        assert ring.tenant(bad) is None
    b = create_key(path, "bob")  # picked up without a restart
    assert ring.tenant(b) == "bob"
    key_id = next(e.key_id for e in read_keys_file(path) if e.tenant == "alice")
    assert revoke_key(path, key_id)
    assert ring.tenant(a) is None and ring.tenant(b) == "bob"


def test_cli_prints_the_key_once(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["create", "carol", "--keys", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyRing(path).tenant(key) == "carol"
    assert main(["list", "--keys", str(path)]) == 0
    assert key not in capsys.readouterr().out
    assert main(["create", "Not A Name", "--keys", str(path)]) == 2
    assert "tenant" in capsys.readouterr().err


def test_wrong_key_of_the_right_shape_is_refused(tmp_path):
    """Past the format check: a well-formed key of the right length is looked up by its hash and refused."""
    path = tmp_path / "keys.json"
    key = create_key(path, "alice")
    ring = KeyRing(path, recheck_s=0)
    one_off = key[:-1] + ("A" if key[-1] != "A" else "B")
    stranger = create_key(tmp_path / "other.json", "alice")  # a real key, of another keys file
    for wrong in (one_off, stranger, KEY_PREFIX + "0" * (len(key) - len(KEY_PREFIX))):
        assert len(wrong) == len(key) and wrong.startswith(KEY_PREFIX)
        assert ring.tenant(wrong) is None
    assert ring.tenant(key) == "alice"


def test_malformed_keys_file_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"format_version": 1, "keys": [{"tenant": "alice"}]}))
    with pytest.raises(ValueError, match="entry 0"):
        read_keys_file(path)


# -- a keys file that changes under the service (issue 15, finding 5) ------------------------------

import logging  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402


def test_a_half_written_keys_file_keeps_the_last_good_keys(tmp_path, caplog):
    path = tmp_path / "keys.json"
    a = create_key(path, "alice")
    ring = KeyRing(path, recheck_s=0)
    good = path.read_text()
    path.write_text(good[: len(good) // 2])  # an editor or a copy caught halfway
    with caplog.at_level(logging.WARNING, logger="serve.keys"):
        assert ring.tenant(a) == "alice"
        assert ring.tenant(a) == "alice"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one log line per bad version of the file, not one per request"
    assert str(path) in warnings[0].getMessage() and "last good keys" in warnings[0].getMessage()
    path.write_text(good)
    b = create_key(path, "bob")  # a good file again: read as usual
    assert ring.tenant(b) == "bob" and ring.tenant(a) == "alice"


def test_a_keys_file_others_can_write_is_refused(tmp_path, caplog):
    path = tmp_path / "keys.json"
    a = create_key(path, "alice")
    for mode in (0o666, 0o620, 0o602):
        path.chmod(mode)
        with pytest.raises(PermissionError, match=f"{oct(mode)}") as e:
            KeyRing(path)
        assert str(path) in str(e.value)
        with pytest.raises(PermissionError):
            create_key(path, "mallory")
    path.chmod(0o600)
    ring = KeyRing(path, recheck_s=0)
    assert ring.tenant(a) == "alice"
    path.chmod(0o646)  # became writable by others while serving: its content is no longer trusted
    with caplog.at_level(logging.WARNING, logger="serve.keys"):
        assert ring.tenant(a) == "alice"  # the last good keys, never the new content
    assert "0o646" in caplog.text
    path.chmod(0o644)  # readable by others is fine (a mounted secret often is)
    assert KeyRing(path).tenant(a) == "alice"


def test_concurrent_create_and_revoke_lose_no_key(tmp_path):
    path = tmp_path / "keys.json"
    doomed = [create_key(path, "old") for _ in range(8)]
    doomed_ids = [e.key_id for e in read_keys_file(path)]
    start = threading.Barrier(8)
    created: list[str] = []

    def creator(i):
        start.wait()
        for _ in range(4):
            created.append(create_key(path, f"t{i}"))

    def revoker(i):
        start.wait()
        for key_id in doomed_ids[i::4]:
            assert revoke_key(path, key_id)

    threads = [threading.Thread(target=creator, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=revoker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ring = KeyRing(path)
    assert len(created) == 16 and all(ring.tenant(k) is not None for k in created), "a created key was lost"
    assert not any(ring.tenant(k) for k in doomed), "a revoked key came back"
    assert len(read_keys_file(path)) == 16
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".keys.json.") and not p.endswith(".lock")]
