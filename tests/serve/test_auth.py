"""Who may call what (serve/auth.py): every combination of the two token files and a request's credentials."""

import pytest

from resserve.serve.auth import Access, Verdict, warn_of_open_admin_apis

USER, ADMIN = ["Bearer user"], ["Bearer admin"]


@pytest.mark.parametrize("tokens, admin_tokens, credentials, admin_api, verdict", [
    # only --token-file: one token for everything, as before admin tokens
    (("user",), (), USER, True, Verdict.ALLOWED),
    (("user",), (), [], False, Verdict.UNAUTHENTICATED),
    # both files: the admin APIs take the admin token only, everything else either token
    (("user",), ("admin",), USER, True, Verdict.ADMIN_ONLY),
    (("user",), ("admin",), ADMIN, True, Verdict.ALLOWED),
    (("user",), ("admin",), [], True, Verdict.UNAUTHENTICATED),
    (("user",), ("admin",), ["Bearer wrong"], True, Verdict.UNAUTHENTICATED),
    (("user",), ("admin",), ADMIN, False, Verdict.ALLOWED),
    (("user",), ("admin",), USER, False, Verdict.ALLOWED),
    (("user",), ("admin",), [], False, Verdict.UNAUTHENTICATED),
    # only --admin-token-file: inference open, the admin APIs closed to all but admins
    ((), ("admin",), [], False, Verdict.ALLOWED),
    ((), ("admin",), [], True, Verdict.UNAUTHENTICATED),
    ((), ("admin",), ADMIN, True, Verdict.ALLOWED),
    ((), ("admin",), ADMIN + ADMIN, True, Verdict.UNAUTHENTICATED),  # two credentials: neither counts
])
def test_verdicts(tokens, admin_tokens, credentials, admin_api, verdict):
    assert Access.of(tokens, admin_tokens).verdict(credentials, admin_api) is verdict


def test_no_token_files_ask_for_nothing():
    assert Access.of((), ()) is None


@pytest.mark.parametrize("host, tokens, admin_tokens, warning", [
    ("0.0.0.0", (), (), "open to every client that reaches the server on 0.0.0.0: give --admin-token-file"),
    ("::", ("user",), (), "open to every client with a token (--token-file) on ::: give --admin-token-file"),
    ("resserve.example", (), (), "open to every client that reaches the server on resserve.example"),
    ("0.0.0.0", ("user",), ("admin",), None),
    ("10.1.2.3", (), ("admin",), None),
    ("127.0.0.1", (), (), None),
    ("::1", (), (), None),
    ("localhost", (), (), None),
])
def test_a_server_others_can_reach_says_at_start_when_anyone_may_unload_its_models(
        caplog, host, tokens, admin_tokens, warning):
    caplog.set_level("WARNING", logger="resserve.serve")
    warn_of_open_admin_apis(host, tokens, admin_tokens)
    messages = [record.getMessage() for record in caplog.records]
    if warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warning in messages[0], messages
