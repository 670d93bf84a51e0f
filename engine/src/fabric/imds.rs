//! The Instance Metadata Service (169.254.169.254:80) as agents and scripts use it:
//! `/metadata/instance` (and its sub-paths, `format=text` leaves), `/metadata/versions`,
//! `/metadata/attested/document` and the managed-identity token endpoint.

use super::http::{Request, Response};
use super::FabricConfig;
use serde_json::{json, Value};

/// API versions this emulation answers (IMDS accepts any listed version).
pub const API_VERSIONS: &[&str] = &[
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2022-02-01",
    "2022-03-01",
    "2022-07-01",
    "2022-08-01",
    "2022-09-01",
    "2023-07-01",
    "2023-09-01",
    "2023-11-15",
    "2024-03-15",
    "2024-07-17",
];

/// What the token endpoint does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenAnswer {
    /// Answer with this response.
    Now(Response),
    /// Run the configured token command with these query parameters.
    RunCommand(Vec<(String, String)>),
}

fn bad_request(msg: &str) -> Response {
    Response::json(
        400,
        &json!({ "error": format!("Bad request. {msg} For more information refer to aka.ms/azureimds"), "newest-versions": newest() }),
    )
}

fn newest() -> Vec<&'static str> {
    API_VERSIONS.iter().rev().take(3).copied().collect()
}

/// The `/metadata/instance` document.
pub fn instance(cfg: &FabricConfig) -> Value {
    let mac: String = cfg.mac.iter().map(|b| format!("{b:02X}")).collect();
    // As Azure: a Windows VM has no SSH keys and an empty disablePasswordAuthentication.
    let windows = cfg.os_type.eq_ignore_ascii_case("windows");
    let public_keys = if windows || cfg.public_key.is_empty() {
        json!([])
    } else {
        json!([{"keyData": cfg.public_key, "path": format!("/home/{}/.ssh/authorized_keys", cfg.user)}])
    };
    json!({
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "customData": "",
            "evictionPolicy": "",
            "extendedLocation": {"name": "", "type": ""},
            "isHostCompatibilityLayerVm": "false",
            "licenseType": "",
            "location": cfg.location,
            "name": cfg.hostname,
            "offer": "",
            "osProfile": {
                "adminUsername": cfg.user,
                "computerName": cfg.hostname,
                "disablePasswordAuthentication": if windows { "" } else { "true" }
            },
            "osType": cfg.os_type,
            "placementGroupId": "",
            "plan": {"name": "", "product": "", "publisher": ""},
            "platformFaultDomain": "0",
            "platformUpdateDomain": "0",
            "priority": "",
            "provider": "Microsoft.Compute",
            "publicKeys": public_keys,
            "publisher": "",
            "resourceGroupName": cfg.resource_group,
            "resourceId": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}", cfg.subscription_id, cfg.resource_group, cfg.hostname),
            "securityProfile": {"secureBootEnabled": "false", "virtualTpmEnabled": "false"},
            "sku": "",
            "subscriptionId": cfg.subscription_id,
            "tags": "",
            "tagsList": [],
            "userData": "",
            "version": "",
            "vmId": cfg.vm_id,
            "vmScaleSetName": "",
            "vmSize": cfg.vm_size,
            "zone": ""
        },
        "network": {
            "interface": [{
                "ipv4": {
                    "ipAddress": [{"privateIpAddress": cfg.guest_ip, "publicIpAddress": ""}],
                    "subnet": [{"address": cfg.subnet_address, "prefix": cfg.subnet_prefix.to_string()}]
                },
                "ipv6": {"ipAddress": []},
                "macAddress": mac
            }]
        }
    })
}

/// Answers one IMDS request (the token endpoint may need the token command).
pub fn answer(cfg: &FabricConfig, req: &Request) -> TokenAnswer {
    TokenAnswer::Now(match route(cfg, req) {
        Ok(r) => r,
        Err(params) => return TokenAnswer::RunCommand(params),
    })
}

fn route(cfg: &FabricConfig, req: &Request) -> Result<Response, Vec<(String, String)>> {
    let path = req.path.trim_end_matches('/');
    if path == "/metadata/versions" {
        return Ok(Response::json(200, &json!({ "apiVersions": API_VERSIONS })));
    }
    if !path.starts_with("/metadata/") {
        return Ok(Response::json(404, &json!({"error": "Not found"})));
    }
    if !req
        .header("metadata")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return Ok(bad_request("Required metadata header not specified."));
    }
    if req.header("x-forwarded-for").is_some() {
        return Ok(bad_request("Request contains X-Forwarded-For header."));
    }
    if req.method != "GET" && req.method != "HEAD" {
        return Ok(Response::json(
            405,
            &json!({"error": format!("Bad request. Method {} is not allowed.", req.method)}),
        ));
    }
    match req.query_param("api-version") {
        None | Some("") => return Ok(bad_request("api-version was not specified in the request.")),
        // Any dated version is answered with the current shape (agents pin different ones).
        Some(v) if !is_date(v) => return Ok(bad_request("api-version is invalid.")),
        Some(_) => {}
    }
    if path == "/metadata/identity/oauth2/token" {
        if cfg.token_command.is_some() {
            let params = req
                .query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            return Err(params);
        }
        return Ok(Response::json(
            400,
            &json!({
                "error": "invalid_request",
                "error_description": "Identity not found. kiln builds locally: the build VM has no Azure managed identity and kiln does not issue Azure tokens. To serve tokens to the build VM, run `kiln build --identity-token-command PROGRAM` (see docs/provisioning.md)."
            }),
        ));
    }
    if path == "/metadata/attested/document" {
        let doc = json!({"vmId": cfg.vm_id, "subscriptionId": cfg.subscription_id, "sku": "", "nonce": req.query_param("nonce").unwrap_or_default(), "issuer": "kiln (local build, not signed by Azure)"});
        return Ok(Response::json(
            200,
            &json!({"encoding": "pkcs7", "signature": base64(doc.to_string().as_bytes())}),
        ));
    }
    if path == "/metadata/instance" || path.starts_with("/metadata/instance/") {
        let mut v = instance(cfg);
        for seg in path
            .trim_start_matches("/metadata/instance")
            .split('/')
            .filter(|s| !s.is_empty())
        {
            let next = match &v {
                Value::Object(o) => o.get(seg).cloned(),
                Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i).cloned()),
                _ => None,
            };
            match next {
                Some(n) => v = n,
                None => return Ok(Response::json(404, &json!({"error": "Not found"}))),
            }
        }
        return Ok(match req.query_param("format") {
            Some("text") => match &v {
                Value::String(s) => Response::text(200, s.clone()),
                Value::Object(o) => Response::text(
                    200,
                    o.keys()
                        .map(|k| {
                            if o[k].is_object() || o[k].is_array() {
                                format!("{k}/")
                            } else {
                                k.clone()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
                Value::Array(a) => Response::text(
                    200,
                    (0..a.len())
                        .map(|i| format!("{i}/"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
                other => Response::text(200, other.to_string()),
            },
            Some("json") | None => Response::json(200, &v),
            Some(_) => bad_request("Invalid format."),
        });
    }
    Ok(Response::json(404, &json!({"error": "Not found"})))
}

fn is_date(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
        && v[..4] >= *"2017"
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(target: &str, metadata: bool) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let headers = if metadata {
            vec![("metadata".to_string(), "true".to_string())]
        } else {
            vec![]
        };
        Request {
            method: "GET".into(),
            path: path.into(),
            query: query.into(),
            headers,
            body: vec![],
        }
    }

    fn now(a: TokenAnswer) -> Response {
        match a {
            TokenAnswer::Now(r) => r,
            TokenAnswer::RunCommand(p) => panic!("unexpected command {p:?}"),
        }
    }

    #[test]
    fn instance_metadata_as_cloud_init_reads_it() {
        let cfg = FabricConfig::example();
        let r = now(answer(
            &cfg,
            &get(
                "/metadata/instance?api-version=2021-08-01&extended=true",
                true,
            ),
        ));
        assert_eq!(r.status, 200);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["compute"]["vmId"], cfg.vm_id.as_str());
        assert_eq!(v["compute"]["osProfile"]["adminUsername"], "packer");
        assert_eq!(
            v["compute"]["publicKeys"][0]["keyData"],
            cfg.public_key.as_str()
        );
        assert_eq!(
            v["compute"]["publicKeys"][0]["path"],
            "/home/packer/.ssh/authorized_keys"
        );
        assert_eq!(v["network"]["interface"][0]["macAddress"], "525400123456");
        assert_eq!(
            v["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"],
            "168.63.129.100"
        );
        assert_eq!(v["compute"]["osType"], "Linux");
        assert_eq!(
            v["compute"]["osProfile"]["disablePasswordAuthentication"],
            "true"
        );
        // a Windows VM: no keys (its password is only on the provisioning media)
        let win = FabricConfig {
            os_type: "Windows".into(),
            public_key: String::new(),
            ..cfg.clone()
        };
        let r = now(answer(
            &win,
            &get("/metadata/instance?api-version=2021-08-01", true),
        ));
        let w: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(w["compute"]["osType"], "Windows");
        assert_eq!(w["compute"]["publicKeys"], serde_json::json!([]));
        assert_eq!(
            w["compute"]["osProfile"]["disablePasswordAuthentication"],
            ""
        );
        // the fallback version cloud-init uses, sub-paths and text leaves
        assert_eq!(
            now(answer(
                &cfg,
                &get("/metadata/instance?api-version=2019-06-01", true)
            ))
            .status,
            200
        );
        let r = now(answer(
            &cfg,
            &get(
                "/metadata/instance/compute/vmSize?api-version=2021-08-01&format=text",
                true,
            ),
        ));
        assert_eq!((r.status, r.body), (200, cfg.vm_size.as_bytes().to_vec()));
        let r = now(answer(&cfg, &get("/metadata/instance/network/interface/0/macAddress?api-version=2021-08-01&format=text", true)));
        assert_eq!(r.body, b"525400123456");
        assert_eq!(
            now(answer(
                &cfg,
                &get(
                    "/metadata/instance/compute/nope?api-version=2021-08-01",
                    true
                )
            ))
            .status,
            404
        );
    }

    #[test]
    fn imds_errors_are_azure_shaped() {
        let cfg = FabricConfig::example();
        let r = now(answer(
            &cfg,
            &get("/metadata/instance?api-version=2021-08-01", false),
        ));
        assert_eq!(r.status, 400);
        assert!(String::from_utf8(r.body)
            .unwrap()
            .contains("Required metadata header not specified"));
        let r = now(answer(&cfg, &get("/metadata/instance", true)));
        assert!(
            r.status == 400
                && String::from_utf8(r.body)
                    .unwrap()
                    .contains("api-version was not specified")
        );
        assert_eq!(
            now(answer(
                &cfg,
                &get("/metadata/instance?api-version=1999-01-01", true)
            ))
            .status,
            400
        );
        assert_eq!(
            now(answer(
                &cfg,
                &get("/metadata/instance?api-version=2021-1x-01", true)
            ))
            .status,
            400
        );
        assert_eq!(
            now(answer(&cfg, &get("/metadata/versions", false))).status,
            200
        );
        assert_eq!(
            now(answer(
                &cfg,
                &get("/metadata/../../etc/passwd?api-version=2021-08-01", true)
            ))
            .status,
            404
        );
        assert_eq!(
            now(answer(&cfg, &get("/latest/meta-data/", false))).status,
            404
        );
        let r = now(answer(
            &cfg,
            &get(
                "/metadata/attested/document?api-version=2021-08-01&nonce=1234",
                true,
            ),
        ));
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["encoding"], "pkcs7");
    }

    #[test]
    fn tokens_need_a_command() {
        let mut cfg = FabricConfig::example();
        let r = now(answer(&cfg, &get("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/", true)));
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (r.status, v["error"].as_str()),
            (400, Some("invalid_request"))
        );
        assert!(v["error_description"]
            .as_str()
            .unwrap()
            .contains("--identity-token-command"));
        cfg.token_command = Some(vec!["true".into()]);
        match answer(&cfg, &get("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/", true)) {
            TokenAnswer::RunCommand(p) => assert_eq!(p, vec![("api-version".to_string(), "2018-02-01".to_string()), ("resource".to_string(), "https://management.azure.com/".to_string())]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
