//! The wireserver (168.63.129.16:80) as the Azure Linux agent and cloud-init's Azure datasource
//! use it: `versions`, the goal state and the two configuration documents it names, and the
//! health report — the guest's "provisioning finished" signal.

use super::http::{Request, Response};
use super::{xml_escape, FabricConfig, Health};

/// The protocol version agents ask for (`x-ms-version`).
pub const WIRE_VERSION: &str = "2012-11-30";
/// The role instance's name.
const ROLE: &str = "MachineRole";

/// Answers one wireserver request. The health report, if the request was one, comes back too.
pub fn answer(cfg: &FabricConfig, req: &Request) -> (Response, Option<Health>) {
    let comp = req
        .query_param("comp")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let path = req.path.trim_end_matches('/');
    let is_machine = path == "/machine" || path.starts_with("/machine/");
    match (req.method.as_str(), path, comp.as_str()) {
        ("GET" | "HEAD", "" | "/machine", "versions") => (Response::xml(versions()), None),
        ("GET" | "HEAD", "/machine", "goalstate") => (Response::xml(goal_state(cfg)), None),
        ("GET" | "HEAD", _, "config") if is_machine => match req
            .query_param("type")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("hostingenvironmentconfig") => (Response::xml(hosting_environment(cfg)), None),
            Some("sharedconfig") => (Response::xml(shared_config(cfg)), None),
            _ => (Response::text(404, "unknown configuration type"), None),
        },
        ("POST", "/machine", "health") => match parse_health(&req.body) {
            Some(h) => (Response::new(200, "text/xml; charset=utf-8", ""), Some(h)),
            None => (
                Response::text(400, "the health report has no <State>"),
                None,
            ),
        },
        ("POST", "/machine", "roleproperties" | "telemetrydata") => {
            (Response::new(200, "text/xml; charset=utf-8", ""), None)
        }
        (
            _,
            "" | "/machine",
            "versions" | "goalstate" | "health" | "roleproperties" | "telemetrydata",
        ) => (Response::text(405, "method not allowed"), None),
        _ => (Response::text(404, "not found"), None),
    }
}

fn versions() -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Versions>\n  <Preferred>\n    <Version>{WIRE_VERSION}</Version>\n  </Preferred>\n  <Supported>\n    <Version>{WIRE_VERSION}</Version>\n    <Version>2010-12-15</Version>\n    <Version>2010-28-10</Version>\n  </Supported>\n</Versions>\n"
    )
}

fn instance_id(cfg: &FabricConfig) -> String {
    format!("{}.{ROLE}_IN_0", cfg.vm_id)
}

fn config_url(cfg: &FabricConfig, kind: &str) -> String {
    xml_escape(&format!(
        "http://168.63.129.16:80/machine/{}/{}?comp=config&type={kind}&incarnation={}",
        cfg.container_id,
        instance_id(cfg),
        cfg.incarnation
    ))
}

/// The goal state: no Certificates and no ExtensionsConfig, so agents fetch nothing else.
fn goal_state(cfg: &FabricConfig) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>{WIRE_VERSION}</Version>
  <Incarnation>{inc}</Incarnation>
  <Machine>
    <ExpectedState>Started</ExpectedState>
    <StopRolesDeadlineHint>300000</StopRolesDeadlineHint>
    <LBProbePorts>
      <Port>16001</Port>
    </LBProbePorts>
    <ExpectHealthReport>FALSE</ExpectHealthReport>
  </Machine>
  <Container>
    <ContainerId>{container}</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>{instance}</InstanceId>
        <State>Started</State>
        <Configuration>
          <HostingEnvironmentConfig>{hec}</HostingEnvironmentConfig>
          <SharedConfig>{sc}</SharedConfig>
          <ConfigName>{instance}.{container}.{inc}.xml</ConfigName>
        </Configuration>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>
"#,
        inc = cfg.incarnation,
        container = cfg.container_id,
        instance = xml_escape(&instance_id(cfg)),
        hec = config_url(cfg, "hostingEnvironmentConfig"),
        sc = config_url(cfg, "sharedConfig"),
    )
}

fn hosting_environment(cfg: &FabricConfig) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<HostingEnvironmentConfig version="1.0.0.0" goalStateIncarnation="{inc}">
  <StoredCertificates />
  <Deployment name="{dep}" guid="{{{container}}}" incarnation="0" isNonCancellableTopologyChangeEnabled="false">
    <Service name="{name}" guid="{{00000000-0000-0000-0000-000000000000}}" />
    <ServiceInstance name="{dep}.0" guid="{{{vm}}}" />
  </Deployment>
  <Incarnation number="{inc}" instance="{ROLE}_IN_0" guid="{{{vm}}}" />
  <Role guid="{{{vm}}}" name="{ROLE}" hostingEnvironmentVersion="1" software="" softwareType="ApplicationPackage" entryPoint="" parameters="" settleTimeSeconds="10" />
  <HostingEnvironmentSettings name="full" Runtime="kiln">
    <CAS mode="full" />
    <PrivilegeLevel mode="max" />
    <AdditionalProperties><CgiHandlers></CgiHandlers></AdditionalProperties>
  </HostingEnvironmentSettings>
  <ApplicationSettings />
  <ResourceReferences />
</HostingEnvironmentConfig>
"#,
        inc = cfg.incarnation,
        dep = xml_escape(&cfg.deployment_name()),
        container = cfg.container_id,
        vm = cfg.vm_id,
        name = xml_escape(&cfg.hostname),
    )
}

fn shared_config(cfg: &FabricConfig) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<SharedConfig version="1.0.0.0" goalStateIncarnation="{inc}">
  <Deployment name="{dep}" guid="{{{container}}}" incarnation="0" isNonCancellableTopologyChangeEnabled="false">
    <Service name="{name}" guid="{{00000000-0000-0000-0000-000000000000}}" />
    <ServiceInstance name="{dep}.0" guid="{{{vm}}}" />
  </Deployment>
  <Incarnation number="{inc}" instance="{ROLE}_IN_0" guid="{{{vm}}}" />
  <Role guid="{{{vm}}}" name="{ROLE}" settleTimeSeconds="10" />
  <LoadBalancerSettings timeoutSeconds="0" waitLoadBalancerProbeCount="8">
    <Probes>
      <Probe name="{ROLE}" />
    </Probes>
  </LoadBalancerSettings>
  <OutputEndpoints />
  <Instances>
    <Instance id="{ROLE}_IN_0" address="{ip}">
      <FaultDomains randomId="0" updateId="0" updateCount="0" />
      <InputEndpoints>
        <Endpoint name="SSH" address="{ip}:22" protocol="tcp" isPublic="false" enableDirectServerReturn="false" isDirectAddress="false" disableStealthMode="false">
          <LocalPorts>
            <LocalPortRange from="22" to="22" />
          </LocalPorts>
        </Endpoint>
      </InputEndpoints>
    </Instance>
  </Instances>
</SharedConfig>
"#,
        inc = cfg.incarnation,
        dep = xml_escape(&cfg.deployment_name()),
        container = cfg.container_id,
        vm = cfg.vm_id,
        name = xml_escape(&cfg.hostname),
        ip = cfg.guest_ip,
    )
}

/// The text of the first `<tag>…</tag>` (namespace prefixes allowed), unescaped.
fn element(xml: &str, tag: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = xml[from..].find('<') {
        let start = from + i + 1;
        let rest = &xml[start..];
        let end_name = rest.find(|c: char| c == '>' || c == '/' || c.is_whitespace())?;
        let name = &rest[..end_name];
        let local = name.rsplit(':').next().unwrap_or(name);
        if local == tag && !name.starts_with('/') {
            let open_end = start + rest.find('>')?;
            if xml[..open_end].ends_with('/') {
                return Some(String::new());
            }
            let body = &xml[open_end + 1..];
            let close = body
                .find(&format!("</{name}>"))
                .or_else(|| body.find(&format!("</{tag}>")))?;
            return Some(xml_unescape(body[..close].trim()));
        }
        from = start;
    }
    None
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Parses a health report body: `<State>` (Ready/NotReady), `<SubStatus>`, `<Description>`.
pub fn parse_health(body: &[u8]) -> Option<Health> {
    let text = String::from_utf8_lossy(body);
    let state = element(&text, "State")?;
    if state.is_empty() {
        return None;
    }
    let clip = |s: String| {
        s.chars()
            .filter(|c| !c.is_control() || *c == '\n')
            .take(2000)
            .collect::<String>()
    };
    Some(Health {
        state: clip(state),
        sub_status: element(&text, "SubStatus")
            .filter(|s| !s.is_empty())
            .map(clip),
        description: element(&text, "Description")
            .filter(|s| !s.is_empty())
            .map(clip),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::http::Request;

    fn req(method: &str, target: &str, body: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: vec![],
            body: body.as_bytes().to_vec(),
        }
    }

    const READY: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<Health xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">
  <GoalStateIncarnation>1</GoalStateIncarnation>
  <Container><ContainerId>c</ContainerId><RoleInstanceList><Role><InstanceId>i</InstanceId>
    <Health><State>Ready</State></Health></Role></RoleInstanceList></Container></Health>"#;

    const FAILED: &str = r#"<Health><Container><RoleInstanceList><Role><Health><State>NotReady</State>
    <Details><SubStatus>ProvisioningFailed</SubStatus><Description>Could not crawl Azure metadata: failed to read &lt;system-uuid&gt; &amp; more</Description></Details>
    </Health></Role></RoleInstanceList></Container></Health>"#;

    #[test]
    fn health_reports_parse() {
        let h = parse_health(READY.as_bytes()).unwrap();
        assert_eq!(
            (
                h.state.as_str(),
                h.sub_status.clone(),
                h.description.clone()
            ),
            ("Ready", None, None)
        );
        assert!(h.is_ready() && !h.is_failure());
        let h = parse_health(FAILED.as_bytes()).unwrap();
        assert_eq!(h.state, "NotReady");
        assert_eq!(h.sub_status.as_deref(), Some("ProvisioningFailed"));
        assert_eq!(
            h.description.as_deref(),
            Some("Could not crawl Azure metadata: failed to read <system-uuid> & more")
        );
        assert!(h.is_failure());
        // waagent says NotReady/Provisioning while it works: not a failure
        let h = parse_health(b"<Health><State>NotReady</State><Details><SubStatus>Provisioning</SubStatus><Description>Starting</Description></Details></Health>").unwrap();
        assert!(!h.is_failure() && !h.is_ready());
        for bad in [
            "",
            "<Health/>",
            "<State></State>",
            "<State>Ready",
            "\u{0}\u{1}<<<>>>",
            "<State/>",
        ] {
            assert_eq!(parse_health(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn routes() {
        let cfg = FabricConfig::example();
        let (r, _) = answer(&cfg, &req("GET", "/?comp=versions", ""));
        assert!(String::from_utf8(r.body)
            .unwrap()
            .contains("<Preferred>\n    <Version>2012-11-30"));
        let (r, _) = answer(&cfg, &req("GET", "/machine/?comp=goalstate", ""));
        let gs = String::from_utf8(r.body).unwrap();
        assert_eq!(r.status, 200);
        assert!(
            gs.contains("<Incarnation>1</Incarnation>")
                && !gs.contains("Certificates")
                && !gs.contains("ExtensionsConfig"),
            "{gs}"
        );
        let hec = element(&gs, "HostingEnvironmentConfig").unwrap();
        let (p, q) = hec
            .strip_prefix("http://168.63.129.16:80")
            .unwrap()
            .split_once('?')
            .unwrap();
        let (r, _) = answer(&cfg, &req("GET", &format!("{p}?{q}"), ""));
        assert!(String::from_utf8(r.body)
            .unwrap()
            .contains("<HostingEnvironmentConfig"));
        let sc = element(&gs, "SharedConfig").unwrap();
        let (r, _) = answer(
            &cfg,
            &req(
                "GET",
                sc.strip_prefix("http://168.63.129.16:80").unwrap(),
                "",
            ),
        );
        assert!(String::from_utf8(r.body).unwrap().contains("<SharedConfig"));
        let (r, h) = answer(&cfg, &req("POST", "/machine?comp=health", READY));
        assert_eq!((r.status, h.unwrap().state.as_str()), (200, "Ready"));
        assert_eq!(
            answer(&cfg, &req("POST", "/machine?comp=health", "junk"))
                .0
                .status,
            400
        );
        assert_eq!(
            answer(&cfg, &req("POST", "/machine?comp=telemetrydata", "<x/>"))
                .0
                .status,
            200
        );
        assert_eq!(
            answer(&cfg, &req("POST", "/machine?comp=roleProperties", "<x/>"))
                .0
                .status,
            200
        );
        assert_eq!(
            answer(&cfg, &req("DELETE", "/machine?comp=goalstate", ""))
                .0
                .status,
            405
        );
        assert_eq!(answer(&cfg, &req("GET", "/etc/passwd", "")).0.status, 404);
        assert_eq!(
            answer(&cfg, &req("GET", "/machine?comp=config&type=../../x", ""))
                .0
                .status,
            404
        );
    }
}
