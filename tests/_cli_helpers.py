"""Shared assertion for the CLI error policy: one line on stderr, exit code 1, no traceback."""


def assert_one_line_error(result, *needles):
    assert result.exit_code == 1, (result.exit_code, result.output, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("medcam: error:") and "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
