"""The Job postgres-roles of k8s/base/data/postgres.yaml: its script, run for real on this machine.

No Kubernetes here: ``roles.sh`` is taken from the manifest's ConfigMap and run with bash against
the test stack's PostgreSQL as the Job runs it (the instance's superuser in PGUSER, each
service's role name and password in ``<SERVICE>_DB_USER`` / ``_PASSWORD``). Its databases and
roles get a name of this run's own (``DB_PREFIX``, unique role names), dropped afterwards.

The test stack's pg_hba trusts local connections, so what is checked is what the roles may do
once connected (PostgreSQL's privileges), and that each password is set and changes on rotation.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from devstack.layout import ROOT

pytestmark = pytest.mark.integration

MANIFEST = ROOT / "k8s" / "base" / "data" / "postgres.yaml"
SERVICES = ("identity", "catalog", "booking", "payment")


def roles_script() -> str:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "postgres-init"]
    (job,) = [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "postgres-roles"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["bash", "/scripts/roles.sh"], container["command"]
    return str(cm["data"]["roles.sh"])


class Instance:
    """The test stack's PostgreSQL, as the Job sees it, with this run's names."""

    def __init__(self, dsn: str, tmp: Any) -> None:
        params = conninfo_to_dict(dsn)
        self.admin = make_conninfo(dsn, dbname="postgres")
        self.host, self.port, self.superuser = params["host"], params.get("port", "5432"), params["user"]
        tag = uuid.uuid4().hex[:8]
        self.prefix = f"tp_rt{tag}_"
        self.roles = {s: f"rt{tag}_{s}" for s in SERVICES}
        self.passwords = {s: f"pw-{s}-{uuid.uuid4().hex[:6]}" for s in SERVICES}
        self.script = tmp / "roles.sh"
        self.script.write_text(roles_script())

    def db(self, svc: str) -> str:
        return f"{self.prefix}{svc}"

    def run(self, **override: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGHOST": str(self.host),
               "PGPORT": str(self.port), "PGUSER": str(self.superuser), "PGDATABASE": "postgres",
               "DB_PREFIX": self.prefix}
        for svc in SERVICES:
            env[f"{svc.upper()}_DB_USER"] = self.roles[svc]
            env[f"{svc.upper()}_DB_PASSWORD"] = self.passwords[svc]
        env.update(override)
        return subprocess.run(["bash", str(self.script)], env=env, capture_output=True, text=True,
                              timeout=60)

    def query(self, sql: str, params: tuple[Any, ...] = (), db: str = "postgres") -> list[tuple[Any, ...]]:
        with psycopg.connect(make_conninfo(self.admin, dbname=db), autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def as_role(self, svc: str, db_of: str) -> psycopg.Connection[Any]:
        return psycopg.connect(make_conninfo(self.admin, dbname=self.db(db_of), user=self.roles[svc]),
                               autocommit=True)

    def drop(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            for svc in SERVICES:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db(svc)}" WITH (FORCE)')
            for role in self.roles.values():
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture
def pg(pg_dsn: str, tmp_path: Any) -> Iterator[Instance]:
    if not all(map(lambda tool: subprocess.run(["which", tool], capture_output=True).returncode == 0,
                   ("bash", "psql", "pg_isready"))):
        pytest.skip("bash, psql and pg_isready are needed")
    instance = Instance(pg_dsn, tmp_path)
    try:
        yield instance
    finally:
        instance.drop()


def owners(pg: Instance, svc: str) -> dict[str, str]:
    rows = pg.query("""SELECT 'rel ' || relname, pg_get_userbyid(relowner) FROM pg_class
                        WHERE relnamespace = 'public'::regnamespace
                       UNION ALL SELECT 'fn ' || proname, pg_get_userbyid(proowner) FROM pg_proc
                        WHERE pronamespace = 'public'::regnamespace
                       UNION ALL SELECT 'type ' || typname, pg_get_userbyid(typowner) FROM pg_type
                        WHERE typnamespace = 'public'::regnamespace AND typtype = 'e'
                       UNION ALL SELECT 'schema public', pg_get_userbyid(nspowner) FROM pg_namespace
                        WHERE nspname = 'public'""", db=pg.db(svc))
    return {str(k): str(v) for k, v in rows}


def test_each_service_gets_a_role_that_owns_its_own_database_and_nothing_else(pg: Instance) -> None:
    # An older deployment: booking's database made, and migrated, by the superuser.
    pg.query(f'CREATE DATABASE "{pg.db("booking")}"')
    pg.query("""CREATE TABLE orders (id serial PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY);
                CREATE TYPE order_state AS ENUM ('PENDING', 'CONFIRMED');
                CREATE VIEW pending AS SELECT id FROM orders;
                CREATE FUNCTION one() RETURNS int LANGUAGE sql AS 'SELECT 1';
                INSERT INTO orders DEFAULT VALUES""", db=pg.db("booking"))

    run = pg.run()
    assert run.returncode == 0, run.stderr + run.stdout
    roles = {r[0]: r[1:] for r in pg.query(
        "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolcanlogin, rolreplication, rolbypassrls"
        " FROM pg_roles WHERE rolname = ANY(%s)", (list(pg.roles.values()),))}
    assert set(roles) == set(pg.roles.values())
    for attrs in roles.values():
        assert attrs == (False, False, False, True, False, False), attrs
    dbs = dict(pg.query("SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE %s",
                        (pg.prefix + "%",)))
    assert dbs == {pg.db(s): pg.roles[s] for s in SERVICES}

    # What the old deployment made is the service's now: its migrations can alter it.
    assert set(owners(pg, "booking").values()) == {pg.roles["booking"]}, owners(pg, "booking")
    with pg.as_role("booking", "booking") as conn:
        conn.execute("ALTER TABLE orders ADD COLUMN note text")
        conn.execute("INSERT INTO orders (note) VALUES ('mine')")
        conn.execute("CREATE TABLE holds (id int PRIMARY KEY)")
        assert conn.execute("SELECT count(*) FROM pending").fetchone() == (2,)
    # Another service's database is closed to it, and it cannot make one of its own.
    for svc in ("payment", "identity"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            pg.as_role(svc, "booking")
    with pg.as_role("payment", "payment") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(f'CREATE DATABASE "{pg.prefix}more"')


def test_running_again_changes_nothing_but_a_rotated_password(pg: Instance) -> None:
    assert (first := pg.run()).returncode == 0, first.stderr
    hashes = dict(pg.query("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                           (list(pg.roles.values()),)))
    assert all(h and h.startswith("SCRAM-SHA-256$") for h in hashes.values()), hashes
    before = {s: owners(pg, s) for s in SERVICES}

    pg.passwords["catalog"] = "rotated-" + uuid.uuid4().hex[:6]
    again = pg.run()
    assert again.returncode == 0, again.stderr
    after = dict(pg.query("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                          (list(pg.roles.values()),)))
    changed = {role for role in hashes if after[role] != hashes[role]}
    # SCRAM salts each hash, so every password set again hashes anew; the rotated one is among
    # them, and still a SCRAM verifier (the stack's pg_hba trusts local logins: no login by it).
    assert pg.roles["catalog"] in changed and after[pg.roles["catalog"]].startswith("SCRAM-SHA-256$")
    assert {s: owners(pg, s) for s in SERVICES} == before
    with pg.as_role("catalog", "catalog") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (pg.roles["catalog"],)


def test_a_service_role_named_as_the_superuser_or_missing_is_refused(pg: Instance) -> None:
    run = pg.run(BOOKING_DB_USER=str(pg.superuser))
    assert run.returncode != 0 and "must not be the instance's superuser" in run.stderr, run
    missing = pg.run(PAYMENT_DB_PASSWORD="")
    assert missing.returncode != 0 and "PAYMENT_DB_PASSWORD" in missing.stderr, missing
    roles = pg.query("SELECT rolname, rolsuper FROM pg_roles WHERE rolname = %s", (str(pg.superuser),))
    assert roles == [(str(pg.superuser), True)]
