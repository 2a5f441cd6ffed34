"""The `python -m mfmegatron.selfcheck` command users run on a new machine or cluster."""

from mfmegatron import selfcheck


def test_selfcheck_passes_tp_ep_ddp_on_four_gloo_ranks(capsys):
    # tp=2 x ep=2 on 4 ranks: dp=2, so TP/SP linears, expert all-to-all and DDP all run.
    assert selfcheck.main(["--tp", "2", "--ep", "2", "--nproc", "4"]) == 0
    table = capsys.readouterr().out
    for check in ("tensor parallel linears", "sequence parallel linears", "expert all-to-all",
                  "DDP gradient averaging"):
        row = next(line for line in table.splitlines() if line.startswith(check))
        assert " pass " in row, row


def test_selfcheck_reports_bad_sizes_and_exits_non_zero(capsys):
    assert selfcheck.main(["--tp", "3", "--nproc", "2"]) == 1
    table = capsys.readouterr().out
    assert "FAIL" in table and "not divisible by tensor_parallel_size (3)" in table
