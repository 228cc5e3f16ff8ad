"""The KV-layout benchmark runs (small) so it never rots: the three layouts give the same tokens
(it checks that itself); its figures are printed, not asserted."""

import json

from bench import kv_layout


def test_kv_layout_small(capsys):
    result = kv_layout.main(["--small"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert set(last) == {"h64x2_in_place_tokens_per_s", "h64x2_concat_tokens_per_s", "h64x2_per_row_tokens_per_s",
                         "h64x2_in_place_over_concat", "h64x2_in_place_over_per_row"}
    assert all(v > 0 for v in last.values())
