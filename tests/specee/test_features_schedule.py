"""Features against a direct computation through the full LM head; the offline and online schedules."""

import torch

from engine_testlib import engine_from_hf, tiny_config, tiny_hf_model
from mpq.specee.features import draft_logits, features, features_from_logits, final_norm
from mpq.specee.schedule import OnlineSchedule, auto_layers, best_layers, expected_layers


def test_features_match_full_lm_head_reference():
    hf = tiny_hf_model(tiny_config(num_hidden_layers=3), seed=1)
    ids = torch.randint(0, 258, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = hf(ids, output_hidden_states=True).hidden_states  # embeddings + one per layer (last one normed)
    model = engine_from_hf(hf)
    draft = torch.tensor([5, 17, 200, 3])
    W = hf.lm_head.weight
    p_prev = None
    for i in (0, 1):  # the last hidden state HF returns is already normed, so compare the inner ones
        x = states[i + 1][0, -1]
        feat, p_prev_new = features(draft_logits(final_norm(x, model.norm, 1e-6), W[draft]), p_prev)
        ref_logits = hf.lm_head(hf.model.norm(x))[draft]
        ref_p = torch.softmax(ref_logits, -1)
        torch.testing.assert_close(feat[:4], ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feat[4:8], ref_p, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feat[8:], ref_p - (p_prev if p_prev is not None else 0), rtol=1e-4, atol=1e-5)
        p_prev = p_prev_new


def test_batched_training_features_equal_sequential_ones():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 4, generator=gen)
    prev = torch.tensor([-1, 0, 0, 2, 1])[:, None].expand(5, 7)
    batched = features_from_logits(logits, prev)
    for i in range(5):
        p_prev = None if prev[i, 0] < 0 else torch.softmax(logits[prev[i, 0]], -1)
        torch.testing.assert_close(batched[i], features(logits[i], p_prev)[0])


def test_offline_schedule_follows_the_histogram():
    hist = torch.zeros(12)
    hist[4], hist[8], hist[11] = 50, 30, 20
    assert best_layers(hist, 2) == [4, 8]
    depth, calls = expected_layers(hist, [4, 8])
    assert abs(depth - (0.5 * 5 + 0.3 * 9 + 0.2 * 12)) < 1e-9
    assert abs(calls - (0.5 * 1 + 0.3 * 2 + 0.2 * 2)) < 1e-9
    one = best_layers(hist, 1)
    assert one == [4]  # 0.5*5 + 0.5*12 = 8.5 beats [8]: 0.8*9 + 0.2*12 = 9.6
    assert auto_layers(hist, call_cost=0.0) == best_layers(hist, len(auto_layers(hist, 0.0)))
    assert len(auto_layers(hist, call_cost=5.0)) < len(auto_layers(hist, call_cost=0.01))
    assert auto_layers(hist, call_cost=100.0) == []  # predictors that cost more than they save are not scheduled


def test_online_schedule_adds_neighbours_of_the_last_five_exits():
    sched = OnlineSchedule(offline=[10], available=list(range(20)))
    assert sched.layers() == {10}
    sched.record_exit(5)
    assert sched.layers() == {3, 5, 7, 10}
    for e in (12, 12, 12, 12, 12):
        sched.record_exit(e)
    assert sched.layers() == {10, 12, 14}  # the exit at 5 fell out of the history
    sched.record_exit(19)
    assert 21 not in sched.layers() and 17 in sched.layers()


def test_trace_is_scaled_to_the_target_depth():
    from mpq.specee.bench import scaled_trace

    trace = scaled_trace({"15": 300, "30": 100}, 30, 32, 4000, seed=1)
    assert set(trace) == {16, 32}
    assert abs(trace.count(16) / len(trace) - 0.75) < 0.03


def test_draft_bound_exits_at_the_oracle_only_where_the_draft_held_the_token():
    from mpq.specee.evaluate import draft_bound

    oracle = [3, 5, 2, 7]
    proposals = [{10, 11, 12, 13}, {20, 21, 22, 23}, {30, 31, 32, 33}]  # the last step ran with exits off
    nxt = [11, 99, 30, 40]
    assert draft_bound(oracle, proposals, nxt, num_layers=8) == (3 + 8 + 2 + 8, 2, 4)


def test_settled_layer_is_where_every_later_layer_agrees():
    from mpq.specee.evaluate import settled_match
    from mpq.specee.train import earliest_match

    match = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)  # [L = 4, N = 3]
    assert earliest_match(match).tolist() == [0, 1, 3]
    assert earliest_match(settled_match(match)).tolist() == [2, 1, 3]
