"""NUL characters in text a client sends: PostgreSQL text cannot hold them, and they used to end
in a 500 (schemathesis found `POST /api/v1/auth/login` with a NUL in the email). Every door now
answers with the ordinary error for a bad field, on PostgreSQL (the security suite's database)."""

from __future__ import annotations

import io

import pytest

from tests.api.conftest import PASSWORD, bearer, login, png_bytes, signup
from tests.security.conftest import AppFactory, form_token

NUL_EMAIL = "dr\x00x@clinic.test"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": NUL_EMAIL, "password": PASSWORD, "name": "A", "organization": "O"}, "email"),
        ({"email": "a@clinic.test", "password": PASSWORD, "name": "A\x00", "organization": "O"}, "name"),
        ({"email": "a@clinic.test", "password": PASSWORD, "name": "A", "organization": "\x00"}, "organization"),
    ],
)  # fmt: skip
def test_api_signup_refuses_nul(
    make_security_app: AppFactory, body: dict[str, str], field: str
) -> None:
    r = make_security_app().test_client().post("/api/v1/auth/signup", json=body)
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["error"] == {
        "code": "invalid_input",
        "message": f"'{field}' must not contain NUL characters.",
        "details": {"field": field},
    }


def test_api_login_refuses_nul(make_security_app: AppFactory) -> None:
    client = make_security_app().test_client()
    r = client.post("/api/v1/auth/login", json={"email": NUL_EMAIL, "password": "x"})
    assert (r.status_code, r.get_json()["error"]["code"]) == (422, "invalid_input")


def test_submit_refuses_a_nul_client_ref_and_drops_nul_from_the_filename(
    make_security_app: AppFactory,
) -> None:
    client = make_security_app().test_client()
    headers = bearer(login(client, signup(client)["email"])["access_token"])

    def post(client_ref: str, filename: str) -> object:
        form = {"client_ref": client_ref, "file": (io.BytesIO(png_bytes()), filename, "image/png")}
        return client.post(
            "/api/v1/jobs", headers=headers, data=form, content_type="multipart/form-data"
        )

    r = post("ref\x00", "slice.png")
    assert r.status_code == 422 and r.get_json()["error"]["details"] == {"field": "client_ref"}
    r = post("ref", "sli\x00ce.png")
    assert r.status_code == 202, r.get_json()
    job = client.get(r.get_json()["status_url"], headers=headers).get_json()
    assert job["input"]["filename"] == "slice.png"


def test_web_login_and_signup_answer_nul_like_any_bad_field(
    make_security_app: AppFactory,
) -> None:
    client = make_security_app().test_client()
    r = client.post(
        "/login",
        data={
            "email": NUL_EMAIL,
            "password": PASSWORD,
            "csrf_token": form_token(client, "/login"),
        },
    )
    assert r.status_code == 401 and "Email or password is wrong." in r.get_data(as_text=True)
    form = {"name": "Dr A", "email": NUL_EMAIL, "organization": "Clinic", "password": PASSWORD}
    r = client.post("/signup", data={**form, "csrf_token": form_token(client, "/signup")})
    assert r.status_code == 422, r.status_code
