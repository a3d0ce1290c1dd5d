"""A user's program as mypy --strict sees it (scripts/test.sh checks it; it is not
run): every public name of the package must be exported and typed, the TF_*
constants included. Not collected by pytest (no test_ prefix)."""
import tcpframe


def on_message(conn: int, data: bytes) -> None:
    srv.send(conn, data)


srv = tcpframe.Server("127.0.0.1:0", on_message=on_message)
stats: tcpframe.Stats = srv.stats()
code: int = tcpframe.TF_ERR_FULL
reason: tcpframe.CloseReason = tcpframe.CloseReason.LOCAL
pull: tcpframe.PullServer = tcpframe.PullServer("127.0.0.1:0")
client: tcpframe.Client = tcpframe.Client("127.0.0.1", srv.port)
errors: tuple[type[tcpframe.TfError], ...] = (tcpframe.FullError, tcpframe.StoppedError,
                                             tcpframe.NoConnError, tcpframe.InvalidError)
events: list[tcpframe.Event] = pull.poll(16, 0)
info: tcpframe.ConnInfo | None = None
