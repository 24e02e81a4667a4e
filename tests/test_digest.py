"""The one sha256 helper (`ssl_segbench.digest.sha256_hex`) against published test vectors, and the keys built on it
against hashlib directly: folding the helpers must not move a cache key, record key or safe name."""
import hashlib
import json

from ssl_segbench.cache import json_digest
from ssl_segbench.digest import sha256_hex
from ssl_segbench.fingerprint import sha256_file
from ssl_segbench.paths import safe_component

ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2, appendix B.1
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_known_vectors_for_bytes_text_and_chunks():
    assert sha256_hex(b"abc") == sha256_hex("abc") == ABC
    assert sha256_hex([b"a", b"", b"bc"]) == sha256_hex(iter([b"ab", b"c"])) == ABC
    assert sha256_hex(b"") == sha256_hex([]) == EMPTY
    assert sha256_hex("abc", 8) == ABC[:8]


def test_keys_on_it_equal_hashlib_directly(tmp_path):
    obj = {"b": [1, 2], "a": "é", "p": tmp_path}
    text = json.dumps(obj, sort_keys=True, default=str).encode()
    assert json_digest(obj) == hashlib.sha256(text).hexdigest()[:24]
    assert json_digest(obj, 64) == hashlib.sha256(text).hexdigest()
    assert safe_component("a/b") == "a_b-" + hashlib.sha256(b"a/b").hexdigest()[:8]
    data = bytes(range(256)) * 9000  # over two 1 MiB chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
