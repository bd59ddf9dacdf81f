import pytest
from pydantic import ValidationError

from indexer.config import Settings


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "lookstream.toml"
    path.write_text('[kafka]\ngroup_id = "g1"\n[kafka.topics]\nproducts = "shop.products"\n[api]\nport = 9000\n')
    settings = Settings.load(path, **{"api.port": 9100, "kafka.bootstrap_servers": None})
    assert settings.kafka.group_id == "g1" and settings.kafka.topics.products == "shop.products"
    assert settings.api.port == 9100 and settings.kafka.bootstrap_servers == "127.0.0.1:19092"


@pytest.mark.parametrize("text", ['[kafka]\ngroupid = "typo"\n', "[api]\nport = -1\n"])
def test_typos_and_bad_values_are_refused(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValidationError):
        Settings.load(path)
