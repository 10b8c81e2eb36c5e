"""How the sandbox (reward_fns/sandbox.py) caps what the processes write: one CappedBuffer for the
code's output and the judge's verdict lines."""

from __future__ import annotations

import os
import time

from reward_fns import sandbox
from reward_fns.sandbox import CappedBuffer, SandboxLimits, run_python_tests


def test_chunks_under_the_cap_are_kept_whole():
    buffer = CappedBuffer(cap=10)
    buffer.append(b"abc")
    buffer.append(b"defg")
    assert bytes(buffer.data) == b"abcdefg" and not buffer.overflowed


def test_filling_the_cap_exactly_is_not_an_overflow_but_one_byte_more_is():
    buffer = CappedBuffer(cap=5)
    buffer.append(b"abcde")
    assert bytes(buffer.data) == b"abcde" and not buffer.overflowed
    buffer.append(b"")  # end of file reads as an empty chunk: nothing arrived, nothing dropped
    assert not buffer.overflowed
    buffer.append(b"f")
    assert bytes(buffer.data) == b"abcde" and buffer.overflowed


def test_a_chunk_crossing_the_cap_keeps_its_head_and_the_overflow_stays():
    buffer = CappedBuffer(cap=4)
    buffer.append(b"ab")
    buffer.append(b"cdef")
    assert bytes(buffer.data) == b"abcd" and buffer.overflowed
    buffer.append(b"")
    assert bytes(buffer.data) == b"abcd" and buffer.overflowed


def test_output_at_the_cap_exactly_is_kept_whole_and_does_not_stop_the_run():
    code = "import sys\nsys.stdout.write('y' * 1000)\ndef f():\n    return 1\n"
    result = run_python_tests(code, ["assert f() == 1"], SandboxLimits(max_output_bytes=1000))
    assert result.passed == [True] and not result.output_exceeded
    assert result.output == "y" * 1000


def test_after_the_deadline_output_is_read_only_when_it_is_there():
    # The verdict pipe has a line and the output pipe nothing, both writers still open (the processes
    # live until they are killed): reading the output then would wait for the code. Non-blocking here,
    # so such a read raises instead of hanging the test.
    pipes = sandbox._Pipes.open()
    try:
        os.set_blocking(pipes.output_read, False)
        os.write(pipes.verdict_write, b"late verdict\n")
        output, verdicts = CappedBuffer(cap=100), CappedBuffer(cap=100)
        expired = time.monotonic() - 1.0
        assert sandbox._read_until_verdicts(pipes, output=output, verdicts=verdicts, deadline=expired)
        assert output.data == b""
        os.write(pipes.output_write, b"printed before the kill")
        assert sandbox._read_until_verdicts(pipes, output=output, verdicts=verdicts, deadline=expired)
        assert output.data == b"printed before the kill"
    finally:
        pipes.close()
