"""Who may call what (serve/auth.py): every combination of the two token files and a request's credentials."""

import pytest

from resserve.serve.auth import Access, Verdict

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
