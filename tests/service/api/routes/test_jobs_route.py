"""The 202 answer of job submission, as documented. Its Location header and result_url are
checked on real jobs in tests/e2e/test_service_e2e.py; the paged /jobs listing in
tests/service/test_pagination.py."""


def test_docs_show_the_202_location_of_every_route_that_submits_a_job(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/linear-head", "/audits"):
        accepted = paths[path]["post"]["responses"]["202"]
        assert "Location" in accepted["headers"], path
        assert accepted["content"]["application/json"]["schema"]["$ref"].endswith("JobAccepted")
