//! The DHCP server an Azure VM sees: the same lease QEMU's user network (slirp) would give,
//! plus what Azure's DHCP adds — option 245 (the wireserver's address, which the Azure
//! Linux agent looks for in its lease) and classless static routes (option 121) to the
//! wireserver and IMDS through the gateway.
//!
//! Pure packet code: [`classify`] looks at one Ethernet frame the guest sent, [`answer`]
//! builds the reply frame. Nothing here trusts the frame: every length is checked, and a
//! frame that is not a well-formed DHCP request is either passed on ([`Frame::Other`]) or
//! dropped ([`Frame::Malformed`]); nothing panics.

use std::net::Ipv4Addr;

/// UDP port of DHCP servers.
pub const SERVER_PORT: u16 = 67;
/// UDP port of DHCP clients.
pub const CLIENT_PORT: u16 = 68;
/// The BOOTP/DHCP magic cookie.
const COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Fixed BOOTP header length (before the cookie).
const BOOTP_LEN: usize = 236;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// 1
    Discover,
    /// 2
    Offer,
    /// 3
    Request,
    /// 4
    Decline,
    /// 5
    Ack,
    /// 6
    Nak,
    /// 7
    Release,
    /// 8
    Inform,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<MessageType> {
        Some(match v {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }
    fn code(self) -> u8 {
        match self {
            MessageType::Discover => 1,
            MessageType::Offer => 2,
            MessageType::Request => 3,
            MessageType::Decline => 4,
            MessageType::Ack => 5,
            MessageType::Nak => 6,
            MessageType::Release => 7,
            MessageType::Inform => 8,
        }
    }
    /// The name, as in RFC 2131 (`DISCOVER`).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Discover => "DISCOVER",
            MessageType::Offer => "OFFER",
            MessageType::Request => "REQUEST",
            MessageType::Decline => "DECLINE",
            MessageType::Ack => "ACK",
            MessageType::Nak => "NAK",
            MessageType::Release => "RELEASE",
            MessageType::Inform => "INFORM",
        }
    }
}

/// A DHCP request from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Option 53.
    pub kind: MessageType,
    /// The transaction id.
    pub xid: [u8; 4],
    /// The BOOTP flags (bit 15: broadcast).
    pub flags: u16,
    /// The client's address, if it has one (`ciaddr`).
    pub ciaddr: Ipv4Addr,
    /// The client hardware address field, as sent (16 bytes).
    pub chaddr: [u8; 16],
    /// The frame's source MAC.
    pub mac: [u8; 6],
    /// Option 50.
    pub requested: Option<Ipv4Addr>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
}

/// What one guest frame is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A DHCP request for the server: kiln answers it.
    Dhcp(Request),
    /// Addressed to the DHCP server port, but not a request kiln can read; dropped (the
    /// reason says why).
    Malformed(&'static str),
    /// Anything else: passed on to QEMU's network unchanged.
    Other,
}

/// The lease and the options kiln's DHCP hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The server (and gateway) address, slirp's virtual host.
    pub server: Ipv4Addr,
    /// The guest's address.
    pub client: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// The DNS server.
    pub dns: Ipv4Addr,
    /// Lease time in seconds.
    pub lease_secs: u32,
    /// Option 245: the wireserver.
    pub wireserver: Ipv4Addr,
    /// Option 121: `(destination, prefix)`, each through the gateway; the default route is
    /// always first (a client that gets option 121 ignores option 3, RFC 3442).
    pub routes: Vec<(Ipv4Addr, u8)>,
}

impl Lease {
    /// The source MAC of the server's frames: slirp's (`52:55` and the server address), so
    /// the guest sees one gateway.
    pub fn server_mac(&self) -> [u8; 6] {
        let o = self.server.octets();
        [0x52, 0x55, o[0], o[1], o[2], o[3]]
    }

    /// The subnet mask.
    pub fn netmask(&self) -> Ipv4Addr {
        let p = u32::from(self.prefix.min(32));
        Ipv4Addr::from(if p == 0 { 0 } else { u32::MAX << (32 - p) })
    }
}

/// Reads one Ethernet frame the guest sent.
pub fn classify(frame: &[u8]) -> Frame {
    // Ethernet II, IPv4 only (no VLAN tags on this network).
    if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
        return Frame::Other;
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return Frame::Other;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 || ip.len() < ihl + 8 {
        return Frame::Other;
    }
    // Fragments other than the first carry no UDP header.
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x1fff != 0 {
        return Frame::Other;
    }
    let udp = &ip[ihl..];
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    if dport != SERVER_PORT {
        return Frame::Other;
    }
    if frag & 0x2000 != 0 {
        return Frame::Malformed("fragmented DHCP request");
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total < ihl + 8 || total > ip.len() {
        return Frame::Malformed("bad IPv4 total length");
    }
    let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if ulen < 8 || ihl + ulen > total {
        return Frame::Malformed("bad UDP length");
    }
    let bootp = &udp[8..ulen];
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[6..12]);
    match parse_bootp(bootp, mac) {
        Ok(r) => Frame::Dhcp(r),
        Err(e) => Frame::Malformed(e),
    }
}

fn parse_bootp(b: &[u8], mac: [u8; 6]) -> Result<Request, &'static str> {
    if b.len() < BOOTP_LEN + 4 {
        return Err("BOOTP message too short");
    }
    if b[0] != 1 {
        return Err("not a BOOTREQUEST");
    }
    if b[BOOTP_LEN..BOOTP_LEN + 4] != COOKIE {
        return Err("no DHCP magic cookie");
    }
    let mut xid = [0u8; 4];
    xid.copy_from_slice(&b[4..8]);
    let flags = u16::from_be_bytes([b[10], b[11]]);
    let ciaddr = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    let mut chaddr = [0u8; 16];
    chaddr.copy_from_slice(&b[28..44]);
    let (mut kind, mut requested, mut server_id) = (None, None, None);
    let opts = &b[BOOTP_LEN + 4..];
    let mut i = 0;
    while i < opts.len() {
        let code = opts[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = usize::from(*opts.get(i + 1).ok_or("truncated DHCP option")?);
        let val = opts
            .get(i + 2..i + 2 + len)
            .ok_or("truncated DHCP option")?;
        match (code, len) {
            (53, 1) => {
                kind = Some(MessageType::from_u8(val[0]).ok_or("unknown DHCP message type")?)
            }
            (50, 4) => requested = Some(Ipv4Addr::new(val[0], val[1], val[2], val[3])),
            (54, 4) => server_id = Some(Ipv4Addr::new(val[0], val[1], val[2], val[3])),
            (53 | 50 | 54, _) => return Err("bad DHCP option length"),
            _ => {}
        }
        i += 2 + len;
    }
    Ok(Request {
        kind: kind.ok_or("no DHCP message type")?,
        xid,
        flags,
        ciaddr,
        chaddr,
        mac,
        requested,
        server_id,
    })
}

/// The server's reply type to `req`, or `None` when it gets none (RELEASE, DECLINE, a
/// REQUEST for another server, server-to-client types).
pub fn reply_type(req: &Request, lease: &Lease) -> Option<MessageType> {
    match req.kind {
        MessageType::Discover => Some(MessageType::Offer),
        MessageType::Request => {
            if req.server_id.is_some_and(|s| s != lease.server) {
                return None;
            }
            let asked = req
                .requested
                .or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr));
            match asked {
                Some(a) if a != lease.client => Some(MessageType::Nak),
                _ => Some(MessageType::Ack),
            }
        }
        MessageType::Inform => Some(MessageType::Ack),
        _ => None,
    }
}

/// The reply frame to `req` (broadcast, as slirp sends its own), or `None` as
/// [`reply_type`] says.
pub fn answer(req: &Request, lease: &Lease) -> Option<(MessageType, Vec<u8>)> {
    let kind = reply_type(req, lease)?;
    let mut b = Vec::with_capacity(BOOTP_LEN + 128);
    b.extend_from_slice(&[2, 1, 6, 0]);
    b.extend_from_slice(&req.xid);
    b.extend_from_slice(&[0, 0]); // secs
    b.extend_from_slice(&req.flags.to_be_bytes());
    let inform = req.kind == MessageType::Inform;
    b.extend_from_slice(&if inform { req.ciaddr.octets() } else { [0; 4] });
    let yiaddr = match kind {
        MessageType::Nak => Ipv4Addr::UNSPECIFIED,
        _ if inform => Ipv4Addr::UNSPECIFIED,
        _ => lease.client,
    };
    b.extend_from_slice(&yiaddr.octets());
    b.extend_from_slice(&lease.server.octets()); // siaddr
    b.extend_from_slice(&[0; 4]); // giaddr
    b.extend_from_slice(&req.chaddr);
    b.extend_from_slice(&[0; 192]); // sname, file
    b.extend_from_slice(&COOKIE);
    b.extend_from_slice(&[53, 1, kind.code()]);
    b.extend_from_slice(&[54, 4]);
    b.extend_from_slice(&lease.server.octets());
    if kind != MessageType::Nak {
        if !inform {
            b.extend_from_slice(&[51, 4]);
            b.extend_from_slice(&lease.lease_secs.to_be_bytes());
        }
        b.extend_from_slice(&[1, 4]);
        b.extend_from_slice(&lease.netmask().octets());
        b.extend_from_slice(&[3, 4]);
        b.extend_from_slice(&lease.server.octets());
        b.extend_from_slice(&[6, 4]);
        b.extend_from_slice(&lease.dns.octets());
        b.extend_from_slice(&[245, 4]);
        b.extend_from_slice(&lease.wireserver.octets());
        let routes = classless_routes(lease);
        if !routes.is_empty() && routes.len() <= 255 {
            b.push(121);
            b.push(routes.len() as u8);
            b.extend_from_slice(&routes);
        }
    }
    b.push(255);
    // Pad to BOOTP's minimum of 300 bytes, as most servers do.
    while b.len() < 300 {
        b.push(0);
    }
    Some((kind, udp_frame(lease, &b)))
}

/// Option 121's value (RFC 3442): each route as prefix length, the significant octets of
/// the destination, and the router.
pub fn classless_routes(lease: &Lease) -> Vec<u8> {
    let mut v = Vec::new();
    let default = (Ipv4Addr::UNSPECIFIED, 0u8);
    for (dest, prefix) in std::iter::once(&default).chain(lease.routes.iter().filter(|r| r.1 != 0))
    {
        let prefix = (*prefix).min(32);
        v.push(prefix);
        let n = usize::from(prefix).div_ceil(8);
        v.extend_from_slice(&dest.octets()[..n]);
        v.extend_from_slice(&lease.server.octets());
    }
    v
}

fn udp_frame(lease: &Lease, payload: &[u8]) -> Vec<u8> {
    let src = lease.server.octets();
    let dst = [255u8; 4];
    let ulen = (8 + payload.len()) as u16;
    let mut udp = Vec::with_capacity(usize::from(ulen));
    udp.extend_from_slice(&SERVER_PORT.to_be_bytes());
    udp.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    udp.extend_from_slice(&ulen.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + udp.len());
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&ulen.to_be_bytes());
    pseudo.extend_from_slice(&udp);
    let c = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + ulen).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(14 + ip.len() + udp.len());
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&lease.server_mac());
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&udp);
    f
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn lease() -> Lease {
        crate::fabric::FabricConfig::example().lease()
    }

    /// A client's DHCP message as dhclient sends it: broadcast, from 0.0.0.0.
    pub(crate) fn request(kind: u8, extra: &[u8], ciaddr: [u8; 4]) -> Vec<u8> {
        let mut b = vec![1, 1, 6, 0, 0xde, 0xad, 0xbe, 0xef, 0, 3, 0x80, 0];
        b.extend_from_slice(&ciaddr);
        b.extend_from_slice(&[0; 12]);
        b.extend_from_slice(&MAC);
        b.extend_from_slice(&[0; 10 + 192]);
        b.extend_from_slice(&COOKIE);
        b.extend_from_slice(&[53, 1, kind]);
        b.extend_from_slice(extra);
        b.extend_from_slice(&[55, 4, 1, 3, 121, 245, 255]);
        let ulen = (8 + b.len()) as u16;
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&(20 + ulen).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
        f.extend_from_slice(&CLIENT_PORT.to_be_bytes());
        f.extend_from_slice(&SERVER_PORT.to_be_bytes());
        f.extend_from_slice(&ulen.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&b);
        f
    }

    fn discover() -> Vec<u8> {
        request(1, &[], [0; 4])
    }

    /// The options of a reply frame, checking its headers and checksums on the way.
    fn reply_options(f: &[u8]) -> (Vec<(u8, Vec<u8>)>, [u8; 4]) {
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(
            &f[6..12],
            &[0x52, 0x55, 168, 63, 129, 1],
            "slirp's gateway MAC"
        );
        assert_eq!(&f[12..14], &[8, 0]);
        let ip = &f[14..34];
        assert_eq!(checksum(ip), 0, "IPv4 header checksum");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, f.len() - 14);
        assert_eq!(&ip[12..16], &[168, 63, 129, 1]);
        assert_eq!(&ip[16..20], &[255; 4]);
        let udp = &f[34..];
        assert_eq!(&udp[0..4], &[0, 67, 0, 68]);
        let mut pseudo = ip[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&udp[4..6]);
        pseudo.extend_from_slice(udp);
        assert_eq!(checksum(&pseudo), 0, "UDP checksum");
        let b = &udp[8..];
        assert_eq!(b[0], 2, "BOOTREPLY");
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef], "xid");
        assert_eq!(&b[28..34], &MAC, "chaddr");
        assert_eq!(&b[236..240], &COOKIE);
        let mut yiaddr = [0; 4];
        yiaddr.copy_from_slice(&b[16..20]);
        let (mut opts, mut i) = (Vec::new(), 240);
        while b[i] != 255 {
            let (c, l) = (b[i], b[i + 1] as usize);
            opts.push((c, b[i + 2..i + 2 + l].to_vec()));
            i += 2 + l;
        }
        (opts, yiaddr)
    }

    fn opt(opts: &[(u8, Vec<u8>)], code: u8) -> Option<Vec<u8>> {
        opts.iter().find(|o| o.0 == code).map(|o| o.1.clone())
    }

    #[test]
    fn discover_gets_an_offer_with_azures_options() {
        let Frame::Dhcp(req) = classify(&discover()) else {
            panic!("not read as DHCP")
        };
        assert_eq!(req.kind, MessageType::Discover);
        assert_eq!(req.mac, MAC);
        assert_eq!(req.flags, 0x8000);
        let (kind, f) = answer(&req, &lease()).unwrap();
        assert_eq!(kind, MessageType::Offer);
        let (opts, yiaddr) = reply_options(&f);
        assert_eq!(yiaddr, [168, 63, 129, 100]);
        assert_eq!(opt(&opts, 53), Some(vec![2]));
        assert_eq!(opt(&opts, 54), Some(vec![168, 63, 129, 1]));
        assert_eq!(opt(&opts, 1), Some(vec![254, 0, 0, 0]));
        assert_eq!(opt(&opts, 3), Some(vec![168, 63, 129, 1]));
        assert_eq!(opt(&opts, 6), Some(vec![168, 63, 129, 3]));
        assert_eq!(opt(&opts, 51), Some(86400u32.to_be_bytes().to_vec()));
        assert_eq!(
            opt(&opts, 245),
            Some(vec![168, 63, 129, 16]),
            "the wireserver"
        );
        assert_eq!(
            opt(&opts, 121),
            Some(vec![
                0, 168, 63, 129, 1, // default
                32, 168, 63, 129, 16, 168, 63, 129, 1, // wireserver
                32, 169, 254, 169, 254, 168, 63, 129, 1, // IMDS
            ])
        );
    }

    #[test]
    fn requests_are_acked_or_naked() {
        let l = lease();
        let read = |f: Vec<u8>| match classify(&f) {
            Frame::Dhcp(r) => r,
            other => panic!("{other:?}"),
        };
        // SELECTING: requested address and our server id.
        let r = read(request(
            3,
            &[50, 4, 168, 63, 129, 100, 54, 4, 168, 63, 129, 1],
            [0; 4],
        ));
        let (k, f) = answer(&r, &l).unwrap();
        assert_eq!(k, MessageType::Ack);
        let (opts, yiaddr) = reply_options(&f);
        assert_eq!(yiaddr, [168, 63, 129, 100]);
        assert_eq!(opt(&opts, 245), Some(vec![168, 63, 129, 16]));
        // RENEWING: ciaddr only.
        let r = read(request(3, &[], [168, 63, 129, 100]));
        assert_eq!(answer(&r, &l).unwrap().0, MessageType::Ack);
        // INIT-REBOOT with an address from another network (the image's last boot on Azure).
        let r = read(request(3, &[50, 4, 10, 0, 0, 4], [0; 4]));
        let (k, f) = answer(&r, &l).unwrap();
        assert_eq!(k, MessageType::Nak);
        let (opts, yiaddr) = reply_options(&f);
        assert_eq!(yiaddr, [0; 4]);
        assert_eq!(opt(&opts, 245), None);
        // For another server: silence.
        let r = read(request(
            3,
            &[50, 4, 168, 63, 129, 100, 54, 4, 10, 0, 0, 1],
            [0; 4],
        ));
        assert_eq!(answer(&r, &l), None);
        // INFORM: options, no address, no lease time.
        let r = read(request(8, &[], [168, 63, 129, 100]));
        let (k, f) = answer(&r, &l).unwrap();
        assert_eq!(k, MessageType::Ack);
        let (opts, yiaddr) = reply_options(&f);
        assert_eq!(yiaddr, [0; 4]);
        assert_eq!(opt(&opts, 51), None);
        assert_eq!(opt(&opts, 245), Some(vec![168, 63, 129, 16]));
        // RELEASE, DECLINE and server messages: silence.
        for kind in [7, 4, 2, 5, 6] {
            assert_eq!(
                answer(&read(request(kind, &[], [0; 4])), &l),
                None,
                "type {kind}"
            );
        }
    }

    #[test]
    fn other_frames_pass() {
        let arp = [&[0xff; 6][..], &MAC, &[0x08, 0x06], &[0; 28]].concat();
        assert_eq!(classify(&arp), Frame::Other);
        let mut dns = discover();
        dns[36..38].copy_from_slice(&53u16.to_be_bytes()); // UDP to port 53
        assert_eq!(classify(&dns), Frame::Other);
        let mut tcp = discover();
        tcp[23] = 6;
        assert_eq!(classify(&tcp), Frame::Other);
        let mut v6 = discover();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(classify(&v6), Frame::Other);
        assert_eq!(classify(&[]), Frame::Other);
    }

    #[test]
    fn malformed_requests_are_dropped_not_answered() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (request(3, &[50, 2, 1, 2], [0; 4]), "bad DHCP option length"),
            (request(9, &[], [0; 4]), "unknown DHCP message type"),
            (
                {
                    let mut f = discover();
                    f[42] = 2; // BOOTREPLY
                    f
                },
                "not a BOOTREQUEST",
            ),
            (
                {
                    let mut f = discover();
                    f[42 + 236] = 0; // cookie
                    f
                },
                "no DHCP magic cookie",
            ),
            (
                {
                    let mut f = discover();
                    let n = f.len() - 8;
                    f.truncate(n); // IP and UDP lengths now larger than the frame
                    f
                },
                "bad IPv4 total length",
            ),
            (
                {
                    let mut f = discover();
                    f[38..40].copy_from_slice(&4u16.to_be_bytes());
                    f
                },
                "bad UDP length",
            ),
            (
                {
                    let mut f = discover();
                    f[20] = 0x20; // more fragments
                    f
                },
                "fragmented DHCP request",
            ),
        ];
        for (f, why) in cases {
            assert_eq!(classify(&f), Frame::Malformed(why));
        }
        // An option whose length runs past the end (no end marker).
        let mut f = request(1, &[], [0; 4]);
        let n = f.len();
        f[n - 7..].copy_from_slice(&[55, 200, 1, 2, 3, 4, 5]);
        assert_eq!(classify(&f), Frame::Malformed("truncated DHCP option"));
    }

    #[test]
    fn no_frame_crashes_it() {
        let l = lease();
        let good = request(
            3,
            &[50, 4, 168, 63, 129, 100, 12, 3, b'v', b'm', b'0'],
            [0; 4],
        );
        // Every truncation of a valid request, with the lengths fixed up or not.
        for n in 0..good.len() {
            let _ = classify(&good[..n]).clone();
        }
        // Random bytes and random mutations of valid requests (xorshift, fixed seed).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut answered = 0;
        for i in 0..20_000 {
            let f: Vec<u8> = if i % 2 == 0 {
                let n = (next() % 700) as usize;
                let mut f: Vec<u8> = (0..n).map(|_| next() as u8).collect();
                if f.len() > 37 {
                    // Often enough an IPv4 UDP frame to the server port, to get past the filter.
                    f[12..14].copy_from_slice(&[8, 0]);
                    f[14] = 0x45;
                    f[23] = 17;
                    f[36..38].copy_from_slice(&67u16.to_be_bytes());
                }
                f
            } else {
                let mut f = good.clone();
                for _ in 0..(next() % 4 + 1) {
                    let at = (next() as usize) % f.len();
                    f[at] = next() as u8;
                }
                if next() % 3 == 0 {
                    let n = (next() as usize) % f.len();
                    f.truncate(n);
                }
                f
            };
            if let Frame::Dhcp(r) = classify(&f) {
                if let Some((_, reply)) = answer(&r, &l) {
                    // Whatever was asked, the reply is a well-formed frame.
                    assert_eq!(checksum(&reply[14..34]), 0);
                    answered += 1;
                }
            }
        }
        assert!(
            answered > 100,
            "mutations of a valid request are still answered ({answered})"
        );
    }

    #[test]
    fn netmask_and_routes_follow_the_lease() {
        let mut l = lease();
        assert_eq!(l.netmask(), Ipv4Addr::new(254, 0, 0, 0));
        l.prefix = 24;
        assert_eq!(l.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        l.prefix = 0;
        assert_eq!(l.netmask(), Ipv4Addr::UNSPECIFIED);
        l.routes = vec![(Ipv4Addr::new(10, 1, 0, 0), 17)];
        assert_eq!(
            classless_routes(&l),
            vec![0, 168, 63, 129, 1, 17, 10, 1, 0, 168, 63, 129, 1]
        );
    }
}
