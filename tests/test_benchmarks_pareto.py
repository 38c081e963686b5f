"""The Pareto benchmark package: its verdict logic, its policies of a budget, its store and its studies.

`python -m benchmarks.pareto` trains for hours; these tests give its comparison-budget
rule, its verdict and its tilted random draws made-up summaries and costs, whose
right answers are worked out by hand here, and check that a fresh clone resumes
from the runs stored in a results JSON.
"""

import json
import pathlib

import numpy as np
import pytest

from benchmarks.pareto import methods, policies, results, store, study

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _rows(accuracies, bops):
    return [{"accuracy": a, "bops": b} for a, b in zip(accuracies, bops)]


def _ladder(int4, int3, int2, int8=(0.960, 0.962, 0.964)):
    bops = {"int2": 10.0, "int3": 22.5, "int4": 40.0, "int8": 160.0}
    return {f"uniform {name}": results.summary(_rows(accuracies, [bops[name]] * 3))
            for name, accuracies in (("int4", int4), ("int3", int3), ("int2", int2), ("int8", int8))}


def test_comparison_budget_is_the_first_format_whose_gap_to_int8_is_three_spreads():
    # INT4 and INT3 sit within noise of INT8; INT2 is 6 points below with a spread of 1.
    summaries = _ladder(int4=(0.955, 0.965, 0.960), int3=(0.945, 0.960, 0.950),
                        int2=(0.890, 0.900, 0.910))
    budget, gaps = results.comparison_budget(summaries)
    assert budget == f"int2*{results.INT2_ROOM}"
    assert gaps["int4"] < 3 and gaps["int3"] < 3
    assert gaps["int2"] == pytest.approx((0.962 - 0.900) / 0.01, rel=1e-6)

    # A clear INT4 gap: compared there, INT3 and INT2 not looked at.
    summaries = _ladder(int4=(0.900, 0.901, 0.902), int3=(0.8, 0.8, 0.8), int2=(0.5, 0.5, 0.5))
    budget, gaps = results.comparison_budget(summaries)
    assert budget == "int4" and set(gaps) == {"int4"}


def _at_budget(fliqs_accuracies, fliqs_bops):
    budget = 11.0
    summaries = _ladder(int4=(0.95,) * 3, int3=(0.94,) * 3, int2=(0.895, 0.900, 0.905),
                        int8=(0.955, 0.960, 0.965))
    summaries.update({
        "random @int2*1.1": results.summary(_rows((0.915, 0.920, 0.925), (10.5, 10.8, 11.2))),
        # Off the budget by far: shown, not compared.
        "hgq2 @int2*1.1": results.summary(_rows((0.97, 0.97, 0.97), (90.0, 95.0, 100.0))),
        # A control: FLIQS's margin over it is given, but it is not a baseline.
        f"random {results.DRAWN} @int2*1.1": results.summary(_rows((0.99, 0.99, 0.99), (10.5, 10.8, 11.2))),
        "fliqs-loss-budget int @int2*1.1": results.summary(_rows(fliqs_accuracies, fliqs_bops)),
    })
    return results.verdict(summaries, "int2*1.1", budget)["fliqs-loss-budget int"]


def test_verdict_meets_the_target_above_every_baseline_with_75_percent_within_budget():
    verdict = _at_budget((0.945, 0.950, 0.955), (10.0, 11.0, 12.0))
    # Gap INT2 -> INT8: 0.96 - 0.90 = 0.06; FLIQS at 0.95 recovers 5/6 of it.
    assert verdict["gap_recovered"] == pytest.approx(5 / 6, rel=1e-6)
    assert set(verdict["margin_over_baselines"]) == {"uniform int2", "random @int2*1.1"}
    assert verdict["margin_over_baselines"]["random @int2*1.1"] == pytest.approx(0.03, abs=1e-9)
    assert verdict["largest_spread"] == pytest.approx(0.005, rel=1e-6)
    assert list(verdict["margin_over_controls"]) == [f"random {results.DRAWN} @int2*1.1"]
    assert verdict["above_every_baseline_by_more_than_spread"]
    assert verdict["every_seed_within_110_percent_of_budget"]
    assert verdict["target_met"]


def test_verdict_fails_for_one_seed_over_the_budget_or_a_small_recovery():
    # One seed at 12.2 > 1.1 x 11: the mean is within, the seed is not.
    verdict = _at_budget((0.945, 0.950, 0.955), (10.0, 10.0, 12.2))
    assert not verdict["every_seed_within_110_percent_of_budget"] and not verdict["target_met"]
    # Above every baseline by more than the spread, but only 70% of the gap.
    verdict = _at_budget((0.937, 0.942, 0.947), (10.0, 11.0, 12.0))
    assert verdict["above_every_baseline_by_more_than_spread"]
    assert verdict["gap_recovered"] == pytest.approx(0.7, rel=1e-6)
    assert not verdict["recovers_75_percent"] and not verdict["target_met"]


def test_verdict_against_the_standard_baselines_leaves_out_the_stricter_ones():
    summaries = _ladder(int4=(0.95,) * 3, int3=(0.94,) * 3, int2=(0.895, 0.900, 0.905),
                        int8=(0.955, 0.960, 0.965))
    summaries.update({
        "sensitivity @int2*1.1": results.summary(_rows((0.925, 0.930, 0.935), (11.0, 11.0, 11.0))),
        # Added here: level with FLIQS, with a wide spread.
        "supernet @int2*1.1": results.summary(_rows((0.930, 0.950, 0.970), (11.0, 11.0, 11.0))),
        "fliqs-loss-budget int @int2*1.1": results.summary(_rows((0.945, 0.950, 0.955), (10.0, 11.0, 12.0))),
    })
    verdict = results.verdict(summaries, "int2*1.1", 11.0)["fliqs-loss-budget int"]
    # Over the supernet by 0 (spread 0.02): the full verdict fails; over uniform INT2 and the
    # sensitivity search by 0.05 and 0.02, more than their largest spread (0.005).
    assert not verdict["above_every_baseline_by_more_than_spread"] and not verdict["target_met"]
    assert verdict["above_standard_baselines_by_more_than_their_spread"]
    assert verdict["target_met_against_standard_baselines"]
    # The same numbers with the sensitivity search 0.004 under FLIQS: not more than the spread.
    summaries["sensitivity @int2*1.1"] = results.summary(_rows((0.941, 0.946, 0.951), (11.0, 11.0, 11.0)))
    verdict = results.verdict(summaries, "int2*1.1", 11.0)["fliqs-loss-budget int"]
    assert not verdict["target_met_against_standard_baselines"]


def test_tilted_draws_hit_the_budget_in_expectation():
    # 3 layers x 4 choices (rows: choices), as the benchmark's [choices, layers] table.
    per_choice = np.array([[1.0, 2.0, 4.0], [2.25, 4.5, 9.0], [4.0, 8.0, 16.0], [16.0, 32.0, 64.0]])
    budget = 1.1 * per_choice.min(axis=0).sum()
    p = policies.tilted(per_choice, budget)
    np.testing.assert_allclose(p.sum(axis=0), 1.0, rtol=1e-12)
    assert (p * per_choice).sum() == pytest.approx(budget, rel=1e-9)
    # Cheaper choices are likelier in every layer.
    assert np.all(np.diff(p, axis=0) < 0)
    # At the expected cost of uniform draws, no tilt is needed: uniform probabilities.
    np.testing.assert_allclose(policies.tilted(per_choice, per_choice.mean(axis=0).sum()), 0.25, atol=1e-6)


def test_tilted_draws_refuse_a_budget_below_the_cheapest_policy():
    per_choice = np.array([[1.0, 2.0], [4.0, 8.0]])
    with pytest.raises(ValueError, match=r"No policy costs less than 2.9 BOPs: the cheapest costs 3"):
        policies.tilted(per_choice, 2.9)


def test_verdict_says_how_much_of_the_gap_the_ceiling_recovers():
    summaries = _ladder(int4=(0.95,) * 3, int3=(0.94,) * 3, int2=(0.895, 0.900, 0.905),
                        int8=(0.955, 0.960, 0.965))
    summaries[f"{results.CEILING} @int2*1.1"] = results.summary(_rows((0.94, 0.94, 0.94), (19.0, 19.0, 19.0)))
    summaries["fliqs-loss-budget int @int2*1.1"] = results.summary(_rows((0.93,) * 3, (10.0,) * 3))
    verdict = results.verdict(summaries, "int2*1.1", 11.0)
    assert verdict[results.CEILING]["gap_recovered"] == pytest.approx(4 / 6, rel=1e-6)
    assert not verdict[results.CEILING]["recovers_75_percent"]
    assert verdict[results.CEILING]["bops_ratio_to_budget"] == pytest.approx(19 / 11, rel=1e-6)
    # A control: FLIQS's margin over it is given, not a baseline's.
    fliqs = verdict["fliqs-loss-budget int"]
    assert set(fliqs["margin_over_baselines"]) == {"uniform int2"}
    assert fliqs["margin_over_controls"][f"{results.CEILING} @int2*1.1"] == pytest.approx(-0.01, abs=1e-9)


def _policies(per_choice):
    """Every policy of a [choices, layers] table, as [policies, layers] choice indices."""
    choices, layers = per_choice.shape
    return np.stack(np.meshgrid(*[np.arange(choices)] * layers, indexing="ij"), -1).reshape(-1, layers)


def _five_layers():
    """Names, the [choices, layers] BOPs, the table by format and `int2*1.1` of a model with two dear layers.

    Rows: the integer choices int2, int3, int4, int8 (BOPs scale 1 : 2.25 : 4 : 16).
    """
    per_choice = np.array([1.0, 2.25, 4.0, 16.0])[:, None] * np.array([0.2, 3.0, 6.0, 0.1, 0.01])[None, :]
    table = dict(zip(study.SPACES[study.BASELINE_SPACE], per_choice))
    return ["stem", "conv1", "conv2", "proj", "logits"], per_choice, table, 1.1 * per_choice[0].sum()


def test_the_ceiling_is_at_or_above_every_policy_within_the_budget_in_every_layer():
    names, per_choice, table, budget = _five_layers()
    ceiling = policies.ceiling(names, table, budget)
    assert ceiling == {"stem": "int8", "conv1": "int2", "conv2": "int2", "proj": "int8", "logits": "int8"}
    top = np.array([study.SPACES[study.BASELINE_SPACE].index(ceiling[n]) for n in names])
    every = _policies(per_choice)
    within = every[per_choice[every, np.arange(len(names))].sum(axis=1) <= budget]
    assert len(within) > 1 and np.all(within <= top)
    # It costs more than the budget: a bound, not a policy within it.
    assert per_choice[top, np.arange(len(names))].sum() > budget
    with pytest.raises(ValueError, match="No policy costs less than"):
        policies.ceiling(names, table, 0.9 * per_choice[0].sum())


def test_the_maximal_policies_are_those_within_the_budget_that_no_single_lift_keeps_within(monkeypatch):
    names, per_choice, table, budget = _five_layers()
    space = study.SPACES[study.BASELINE_SPACE]
    columns = np.arange(len(names))
    every = _policies(per_choice)
    within = every[per_choice[every, columns].sum(axis=1) <= budget]

    def lifts(policy):
        for layer in columns[policy < len(space) - 1]:
            up = policy.copy()
            up[layer] += 1
            if per_choice[up, columns].sum() <= budget:
                return True
        return False

    expected = {tuple(p) for p in within if not lifts(p)}
    # The costs rise with the choice here, so `_ranked`'s ranks are the choice indices.
    assert {tuple(p) for p in policies.within_budget(per_choice, budget)} == {tuple(p) for p in within}
    found = policies.maximal(names, table, budget)
    assert {tuple(space.index(m[n]) for n in names) for m in found} == expected
    assert len(found) == len(expected) > 1
    # More maximal policies than runs are worth: none.
    assert policies.maximal(names, table, budget, limit=len(expected)) == found
    monkeypatch.setattr(policies, "MAXIMAL_LIMIT", len(expected) - 1)
    assert policies.maximal(names, table, budget) is None
    # Nor when the policies within the budget are too many to list.
    monkeypatch.setattr(policies, "LISTED", len(within) - 1)
    assert policies.maximal(names, table, budget, limit=100) is None


def test_verdict_names_the_best_maximal_policy():
    summaries = _ladder(int4=(0.95,) * 3, int3=(0.94,) * 3, int2=(0.895, 0.900, 0.905),
                        int8=(0.955, 0.960, 0.965))
    summaries[f"{results.MAXIMAL} 1 @int2*1.1"] = results.summary(_rows((0.92,) * 3, (10.8,) * 3))
    summaries[f"{results.MAXIMAL} 2 @int2*1.1"] = results.summary(_rows((0.95,) * 3, (10.9,) * 3))
    verdict = results.verdict(summaries, "int2*1.1", 11.0)
    best = verdict["best_maximal_policy"]
    assert best["group"] == f"{results.MAXIMAL} 2 @int2*1.1" and best["of"] == 2
    assert best["gap_recovered"] == pytest.approx(5 / 6, rel=1e-6) and best["recovers_75_percent"]
    assert set(verdict["baseline_bops_ratio_to_budget"]) == {"uniform int2"}  # controls, not baselines


def _digits_model(seed=0):
    """A small searchable conv-BN model of the 8x8 digits."""
    import keras

    import fliqs_keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    hidden = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(hidden))
    outputs = keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(hidden))
    model = fliqs_keras.apply(keras.Model(inputs, outputs), ["int2", "int4", "int8"])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_keep_at_freeze_replaces_the_policy_the_search_kept_within_its_budget():
    import fliqs_keras
    from fliqs_keras import data

    (x, y), _ = data.sklearn_digits(seed=0)
    model = _digits_model()
    search = fliqs_keras.FliqsSearch(target="int2*1.1", quality="loss", freeze_at=0.5, max_cost_ratio=1.0, seed=0)
    steps = -(-256 // 32)
    keep = methods.KeepAtFreeze(steps // 2, {"conv": "int8", "logits": "int4"})
    model.fit(x[:256], y[:256], batch_size=32, epochs=1, verbose=0, callbacks=[search, keep])
    # No policy within the search's budget has the conv at INT8: this is the kept policy replaced.
    assert fliqs_keras.chosen_formats(model) == {"conv": "int8", "logits": "int4"}


def test_random_climbs_reach_only_and_every_maximal_policy():
    names, per_choice, table, budget = _five_layers()
    expected = {tuple(sorted(m.items())) for m in policies.maximal(names, table, budget)}
    drawn = policies.maximal_draws(names, table, budget, np.random.default_rng(0), 200)
    # Each climb ends maximal, and every maximal policy is reachable: each one's
    # lower policies fit the budget too.
    assert {tuple(sorted(m.items())) for m in drawn} == expected
    assert len(drawn) == len(expected)
    assert len(policies.maximal_draws(names, table, budget, np.random.default_rng(0), 1)) == 1


def test_held_out_accuracy_normalises_with_batch_statistics_and_leaves_the_model_as_it_was():
    import keras

    from fliqs_keras import data

    (x, y), _ = data.sklearn_digits(seed=0)
    model = _digits_model()
    model.fit(x[:256], y[:256], batch_size=32, epochs=1, verbose=0)
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    held = (x[256:556], y[256:556])
    accuracy = methods.held_out_accuracy(model, held, batch_size=128)
    # The same batches in training mode, counted by hand; then the variables that pass moved, put back.
    expected = sum(int((keras.ops.convert_to_numpy(model(held[0][s:s + 128], training=True)).argmax(-1)
                        == held[1][s:s + 128]).sum()) for s in range(0, 300, 128)) / 300
    assert accuracy == expected
    for variable, value in zip(model.non_trainable_variables, before):
        variable.assign(value)
    methods.held_out_accuracy(model, held, batch_size=128)
    for variable, value in zip(model.non_trainable_variables, before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_uniform_draws_end_in_the_policy_a_function_picks_at_the_freeze():
    from fliqs_keras import cost, data

    (x, y), _ = data.sklearn_digits(seed=0)
    model = _digits_model()
    called_at = []

    def pick(searchable):
        called_at.append(draws.step)
        return {"conv": "int8", "logits": "int4"}

    draws = methods.UniformDraws(0, 4, pick)
    model.fit(x[:256], y[:256], batch_size=32, epochs=1, verbose=0, callbacks=[draws])
    assert called_at == [4]
    held = {n: f.name for w in ("conv", "logits") for n, f in model.get_layer(w).current_formats().items()}
    assert held == {"conv": "int8", "logits": "int4"}
    assert cost.bops(model) == pytest.approx(cost.CostModel(model, "bops").cost(held))


def _payload(*entries):
    return {"benchmark": "pareto", "results": list(entries)}


def _result(dataset, runs, more=None):
    return {"dataset": dataset, "runs": runs, "more_seed_runs": more or {}}


def test_stored_runs_are_each_run_of_the_dataset_once():
    first = {"key": "uniform/int2/0", "accuracy": 0.9, "bops": 10.0}
    later = {"key": "uniform/int2/3", "accuracy": 0.8, "bops": 10.0}
    search = {"key": "fliqs/int/int3/0", "accuracy": 0.95, "bops": 20.0, "policy": {"stem": "int8"}}
    payload = _payload(
        _result("mnist", {"uniform int2": [first], "fliqs int @int3": [search]}, {"uniform int2": [first, later]}),
        _result("digits8", {"uniform int2": [{"key": "uniform/int2/0", "accuracy": 0.5, "bops": 1.0}]}))
    assert store.stored_runs(payload, "mnist") == [first, search, later]
    assert store.stored_runs(payload, "digits8")[0]["accuracy"] == 0.5
    assert store.stored_runs(payload, "cifar10") == []


def test_a_missing_resume_file_starts_from_the_results_json_and_an_existing_one_wins(tmp_path):
    row = {"key": "uniform/int8/0", "accuracy": 0.96, "bops": 160.0}
    stored = store.stored_runs(_payload(_result("mnist", {"uniform int8": [row]})), "mnist")
    path = tmp_path / ".pareto_mnist_runs.jsonl"
    runs = store.Runs(path, stored)
    assert runs.get("uniform/int8/0") == row
    assert runs.run("uniform/int8/0", "uniform", None, 0, {"format": "int8"}) == row  # stored: not trained
    assert store.Runs(path).rows == [row]  # written to the resume file

    kept = {"key": "uniform/int8/0", "accuracy": 0.5, "bops": 160.0}
    path.write_text(json.dumps(kept) + "\n")
    assert store.Runs(path, stored).rows == [kept]


def test_a_replot_never_trains():
    runs = store.Runs(None, [{"key": "uniform/int8/0", "accuracy": 0.96, "bops": 160.0}], frozen=True)
    assert runs.run("uniform/int8/0", "uniform", None, 0, {"format": "int8"})["accuracy"] == 0.96
    with pytest.raises(store.MissingRun, match="uniform/int4/0"):
        runs.run("uniform/int4/0", "uniform", None, 0, {"format": "int4"})


def test_a_study_names_its_results_and_refuses_what_it_does_not_know(tmp_path):
    path = tmp_path / "narrow.json"
    path.write_text(json.dumps({"name": "narrow", "model": "digits_resnet", "width": 0.5, "datasets": ["mnist"]}))
    narrow = study.load(path)
    assert narrow.model_label == "digits_resnet (width 0.5)" and narrow.epochs_of("mnist") == 8
    path.write_text(json.dumps({"name": "x", "widht": 0.5}))
    with pytest.raises(ValueError, match="unknown study fields \\['widht'\\]"):
        study.load(path)
    with pytest.raises(ValueError, match="unknown variants \\['fliqs-fast'\\]"):
        study.Study("x", variants=["fliqs-fast"])
    with pytest.raises(ValueError, match="width, batch_size and epochs must be positive"):
        study.Study("x", width=0.0)


def test_width_scales_the_model():
    from benchmarks.pareto.training import Context

    full = Context(study.Study("full"), "mnist", ()).build(0)
    narrow = Context(study.Study("narrow", width=0.5), "mnist", ()).build(0)
    filters = {model: {layer.name: layer.filters for layer in model.layers if hasattr(layer, "filters")}
               for model in (full, narrow)}
    # Halved, and never under 8 channels (the stem's 12 becomes 8, not 6).
    assert filters[full]["stem_conv"] == 12 and filters[narrow]["stem_conv"] == 8
    assert filters[full]["stage2_block1_2_conv"] == 48 and filters[narrow]["stage2_block1_2_conv"] == 24


@pytest.mark.parametrize("name", ["pareto", "pareto_digits_mobilenet", "pareto_digits_mobilenet_width0.5",
                                  "pareto_digits_resnet_width0.5", "pareto_digits_resnet_width0.75"])
def test_every_committed_result_comes_back_from_its_runs(name):
    # The derived numbers (summaries, comparison budget, verdicts) of each committed JSON, from its runs alone.
    stored = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    config = study.load(ROOT / "benchmarks" / "studies" / f"{name}.json")
    assert [results.replot(config, r) for r in stored["results"]] == stored["results"]


@pytest.mark.slow
def test_a_small_study_runs_resumes_and_replots_to_the_same_results(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "studies" / "tiny.json"
    config.parent.mkdir()
    # Without the controls: they triple its time, and the committed studies' replots cover their results.
    config.write_text(json.dumps({
        "name": "tiny", "datasets": ["digits8"], "seeds": [0], "more_seeds_at_budget": [1], "epochs": 1,
        "methods": ["uniform", "fliqs", "random"], "variants": ["fliqs-loss-budget"], "curves": False,
        "controls": False}))

    def run(*flags):
        result = subprocess.run([sys.executable, "-m", "benchmarks.pareto", f"--study={config}",
                                 f"--output_dir={tmp_path}", *flags], capture_output=True, text=True,
                                timeout=900, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / "tiny.json").read_text())

    first = run()
    result = first["results"][0]
    assert {"uniform int2", "uniform int8", f"random @{result['comparison_budget']}",
            f"fliqs-loss-budget int @{result['comparison_budget']}"} <= set(result["runs"])
    assert result["verdict_with_batch_norm_reestimation"]["seeds"] == [0, 1]
    assert (tmp_path / "tiny.png").stat().st_size > 0 and "## digits8" in (tmp_path / "tiny.md").read_text()
    # Stored runs are read back, not trained again; a replot derives the same JSON from it alone.
    assert run() == first
    (tmp_path / ".tiny_digits8_runs.jsonl").unlink()
    assert run("--replot") == first
