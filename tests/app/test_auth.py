"""Bearer API keys on /api/v1: refusals (401 and its header), valid keys, the key file,
and no keys at all."""

import pytest

from tests.helpers import API, assert_error, generate, load_and_wait, model_entry


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Bearer k1x"},
        {"Authorization": "Basic x"},
        {"Authorization": "Basic k1"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer    "},
        {"Authorization": "k1"},
    ],
)
def test_auth_rejects(make_app, headers):
    client = make_app(api_keys=["k1", "k2"]).test_client()
    for method, path in [
        ("get", "/status"),
        ("get", "/models"),
        ("post", "/generate"),
        ("post", "/models/tiny/load"),
        ("get", "/models/tiny/metrics"),
    ]:
        response = getattr(client, method)(f"{API}{path}", headers=headers)
        error = assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "k1" not in error["message"]
    assert model_entry(client, "tiny", {"Authorization": "Bearer k1"})["status"] == "not_loaded"


@pytest.mark.parametrize("header", ["Bearer k1", "Bearer k2", "bearer k2"])
def test_auth_accepts_valid_keys(make_app, header):
    client = make_app(api_keys=["k1", "k2"]).test_client()
    headers = {"Authorization": header}
    assert client.get(f"{API}/status", headers=headers).status_code == 200
    entry = load_and_wait(client, "tiny", headers=headers)
    assert entry["status"] == "loaded"
    assert generate(client, headers=headers, prompt="hi", max_tokens=2).status_code == 200


def test_auth_key_file(make_app, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n# retired-key\n")
    client = make_app(api_key_file=str(key_file)).test_client()
    for key in ("file-key-1", "file-key-2"):
        assert (
            client.get(f"{API}/status", headers={"Authorization": f"Bearer {key}"}).status_code
            == 200
        )
    for key in ("retired-key", "# retired-key", "# team keys"):
        assert_error(
            client.get(f"{API}/status", headers={"Authorization": f"Bearer {key}"}),
            401,
            "unauthorized",
        )
    assert_error(client.get(f"{API}/status"), 401, "unauthorized")


def test_auth_off_without_keys(client):
    assert client.get(f"{API}/status").status_code == 200
    assert client.get(f"{API}/status", headers={"Authorization": "Bearer x"}).status_code == 200


# Keys whose UTF-8 bytes end in \xa0 or \x85 (which str.strip() would eat from the latin-1
# text a WSGI server hands over), a Cyrillic one, an emoji.
UTF8_KEYS = ["clé-à", "ключ-Ņ", "🔑-key"]


def as_sent(text: str) -> str:
    """A header value as a WSGI server hands it over when the client sent `text` as UTF-8:
    each byte one latin-1 character (PEP 3333; gunicorn does this)."""
    return text.encode("utf-8").decode("latin-1")


def test_utf8_keys_work(make_app):
    client = make_app(api_keys=UTF8_KEYS).test_client()
    for key in UTF8_KEYS:
        response = client.get(f"{API}/status", headers={"Authorization": as_sent(f"Bearer {key}")})
        assert response.status_code == 200, key
    # Not the key: sent as latin-1 bytes, cut inside a character, or another key's bytes.
    for value in ("Bearer clé-à", as_sent("Bearer clé-")[:-1], as_sent("Bearer ключ")):
        assert_error(
            client.get(f"{API}/status", headers={"Authorization": value}), 401, "unauthorized"
        )


def test_a_utf8_key_file_whatever_the_locale(make_app, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_bytes("# clés\nclé-à\n".encode())
    client = make_app(api_key_file=str(key_file)).test_client()
    headers = {"Authorization": as_sent("Bearer clé-à")}
    assert client.get(f"{API}/status", headers=headers).status_code == 200


def test_a_key_no_client_can_send_is_refused_at_start(make_app):
    with pytest.raises(ValueError, match="API key #2 .* control character") as refused:
        make_app(api_keys=["fine", "bad\x01key"])
    assert "bad" not in str(refused.value)
