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
