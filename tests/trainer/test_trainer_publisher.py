"""Fast checked export (template re-weighting + ONNX Runtime parity) and the repository operations."""

from __future__ import annotations

import copy

import pytest
import torch

from export.graphs import model_version
from export.template import ParityError, Template, check_parity, distinct_model, probe_sequences
from serving.repository import publish_version, published_versions
from trainer.publisher import retain, rollback_to
from trainer.testing import TOKENIZER, tiny_config


@pytest.fixture(scope="module")
def template(template_dir) -> Template:
    return Template.load_or_build(tiny_config(), template_dir)


def test_rendered_graphs_compute_what_pytorch_computes(template) -> None:
    model = distinct_model(tiny_config(), seed=11)
    graphs = template.render(model, TOKENIZER)
    assert check_parity(graphs, model, probe_sequences(model.config)) < 1e-4
    meta = {p.key: p.value for p in graphs["ranking"].metadata_props}
    assert meta["model_version"] == model_version(model) and meta["tokenizer_version"] == TOKENIZER


def test_parity_catches_graphs_that_are_not_the_model(template) -> None:
    model = distinct_model(tiny_config(), seed=12)
    broken = copy.deepcopy(template)
    broken.mapping["score_with_cache"].pop(next(iter(broken.mapping["score_with_cache"])))  # one stale weight
    with pytest.raises(ParityError, match="score_with_cache"):
        check_parity(broken.render(model, TOKENIZER), model, probe_sequences(model.config))
    other = distinct_model(tiny_config(), seed=13)
    with pytest.raises(ParityError, match="ranking"):
        check_parity(template.render(other, TOKENIZER), model, probe_sequences(model.config))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ParityError, match="non-finite"):
        check_parity(template.render(model, TOKENIZER), model, probe_sequences(model.config))


def test_retention_and_rollback_never_touch_protected_versions(tmp_path, template) -> None:
    repo = tmp_path / "repo"
    for seed in range(5):
        publish_version(repo, template.render(distinct_model(tiny_config(), seed=20 + seed), TOKENIZER))
    assert sorted(published_versions(repo)) == [1, 2, 3, 4, 5]
    assert retain(repo, keep=2, protect={1}) == [2, 3]
    assert sorted(published_versions(repo)) == [1, 4, 5]
    assert rollback_to(repo) == (4, [5]) and sorted(published_versions(repo)) == [1, 4]
    assert rollback_to(repo, 1) == (1, [4]) and sorted(published_versions(repo)) == [1]
    with pytest.raises(ValueError, match="nothing to roll back"):
        rollback_to(repo)
    assert not any(p.name.startswith(".") for p in repo.iterdir())  # nothing left for Triton to trip on
