import pytest

from configs.service import AuthConfig, ServiceConfig
from deployments.auth import ApiKeyCheck, load_api_key
from deployments.errors import AuthenticationError


def test_key_from_file_and_env(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("  abc \n")
    assert load_api_key(AuthConfig(api_key_file=str(key_file))) == "abc"
    assert load_api_key(AuthConfig(api_key_env="MY_KEY"), environ={"MY_KEY": "xyz"}) == "xyz"
    assert load_api_key(AuthConfig()) is None
    assert ServiceConfig(checkpoint_path="/x").auth.enabled is False


def test_misconfigured_key_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="not set or empty"):
        load_api_key(AuthConfig(api_key_env="MY_KEY"), environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_api_key(AuthConfig(api_key_file=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="cannot be read"):
        load_api_key(AuthConfig(api_key_file=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="at most one"):
        AuthConfig(api_key_file="a", api_key_env="B")


def test_check():
    check = ApiKeyCheck("k1")
    check.check("Bearer k1")
    check.check("bearer k1")
    for header in (None, "", "k1", "Bearer k2", "Basic k1"):
        with pytest.raises(AuthenticationError) as info:
            check.check(header)
        assert info.value.status_code == 401 and info.value.param == "Authorization"
    ApiKeyCheck(None).check(None)  # no key configured: open
