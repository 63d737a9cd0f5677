"""Deployment configs in infra/ that can be validated without their hardware."""

from tests.conftest import ROOT


def test_infra_accelerate_configs_parse():
    """The FSDP launch configs in infra/ are valid accelerate configs (they cannot run here: no GPU)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for path in (ROOT / "infra" / "accelerate").glob("*.yaml"):
        config = load_config_from_file(str(path))
        assert str(config.distributed_type).endswith("FSDP"), path
