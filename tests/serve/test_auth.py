"""Who may call what (serve/auth.py): every combination of the two token files and a request's credentials."""

import os

import pytest
from prometheus_client import CollectorRegistry, Counter

from resserve.serve.auth import Access, TokenRotation, Verdict, warn_of_open_admin_apis
from resserve.serve.settings import ServerSettings

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
    ("0.0.0.0", False, False, "open to every client that reaches the server on 0.0.0.0: give --admin-token-file"),
    ("::", True, False, "open to every client with a token (--token-file) on ::: give --admin-token-file"),
    ("resserve.example", False, False, "open to every client that reaches the server on resserve.example"),
    ("0.0.0.0", True, True, None),
    ("10.1.2.3", False, True, None),
    ("127.0.0.1", False, False, None),
    ("::1", False, False, None),
    ("localhost", False, False, None),
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


def _replace(path, text: str) -> None:
    """Whole at once, as Kubernetes updates a mounted Secret's files."""
    path.with_suffix(".new").write_text(text)
    os.replace(path.with_suffix(".new"), path)


def test_token_files_are_read_again_when_they_change_and_a_change_that_cannot_serve_keeps_the_tokens(tmp_path,
                                                                                                      caplog):
    """A token taken out of its file is refused from the next look on, without a restart; a file
    left empty, gone, or sharing a token with the other file keeps the tokens read before."""
    caplog.set_level("INFO", logger="resserve.serve")
    users, admins = tmp_path / "tokens", tmp_path / "admin"
    users.write_text("leaked\nkept\n")
    admins.write_text("admin\n")
    registry = CollectorRegistry()
    reloads = Counter("reloads", "", ["result"], registry=registry)
    rotation = TokenRotation(ServerSettings(token_file=users, admin_token_file=admins), reloads)
    assert not rotation.renew()  # nothing changed
    allowed = {token: rotation.verdict([f"Bearer {token}"], admin_api=False) is Verdict.ALLOWED
               for token in ("leaked", "kept", "new")}
    assert allowed == {"leaked": True, "kept": True, "new": False}

    _replace(users, "kept\nnew\n")
    assert rotation.renew()
    assert [rotation.verdict([f"Bearer {token}"], admin_api=False) for token in ("leaked", "kept", "new")] == [
        Verdict.UNAUTHENTICATED, Verdict.ALLOWED, Verdict.ALLOWED]
    assert rotation.verdict(["Bearer kept"], admin_api=True) is Verdict.ADMIN_ONLY

    both = "a token is in both --token-file and --admin-token-file: its holders would be admins; give admins " \
           "tokens of their own"
    for change, reason in ((lambda: _replace(admins, "new\n"), both),
                           (lambda: _replace(users, "\n"), f"token file {users} holds no token"),
                           (users.unlink, f"cannot read token file {users}: No such file or directory")):
        caplog.clear()
        change()
        assert not rotation.renew()
        assert [record.getMessage() for record in caplog.records] == [
            f"the token files changed, but {reason}; requests are still checked against the tokens read before"]
        assert rotation.verdict(["Bearer new"], admin_api=False) is Verdict.ALLOWED  # as read before
        assert rotation.verdict(["Bearer leaked"], admin_api=False) is Verdict.UNAUTHENTICATED
    assert [registry.get_sample_value("reloads_total", {"result": result}) for result in ("ok", "refused")] == [1, 3]
