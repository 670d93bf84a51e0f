# kiln tiny guest: parser for the NoCloud seed (meta-data and #cloud-config
# user-data), for the restricted YAML subset documented in docs/test-guests.md:
#
#   #cloud-config                      (user-data must start with this line)
#   hostname: NAME                     (also fqdn:, and local-hostname: in meta-data)
#   ssh_authorized_keys:               (top level: keys for the default user, root;
#     - ssh-ed25519 AAAA... comment     also public-keys: in meta-data)
#   users:
#     - default                        (accepted, nothing to do: root is the default user)
#     - name: packer
#       sudo: ALL=(ALL) NOPASSWD:ALL   (any value but false/null/empty => passwordless sudo)
#       groups: [adm, users]           (or "adm, users", or a block list)
#       shell: /bin/sh
#       homedir: /home/packer
#       ssh_authorized_keys: [ssh-ed25519 AAAA...]   (flow list, or a block list)
#
# Values may be plain, 'single' or "double" quoted. Block lists ("- item") and one-line
# flow lists ("[a, b]") are understood; multi-line strings (| >), anchors, flow mappings
# and multi-document files are not. Unknown keys are ignored with a warning.
#
# Output, one record per line, fields separated by \037 (ASCII unit separator: not
# IFS white space, so empty fields survive `read`), read by /usr/lib/kiln/nocloud:
#   hostname NAME
#   key USER KEY                 (USER "root" for top-level keys)
#   user NAME SUDO(yes|no) SHELL HOME GROUPS(comma separated)
#   warn MESSAGE
# A user record always comes before that user's key records.
#
# Invoke with -v doc=user (user-data) or -v doc=meta (meta-data).

function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function unquote(s) {
	s = trim(s)
	if (s ~ /^".*"$/ || s ~ /^'.*'$/) s = substr(s, 2, length(s) - 2)
	return s
}
function indent_of(s) { match(s, /^ */); return RLENGTH }
function key_of(s) { return trim(substr(s, 1, index(s, ":") - 1)) }
function val_of(s) { return trim(substr(s, index(s, ":") + 1)) }
function is_false(v) {
	v = tolower(unquote(v))
	return v == "" || v == "false" || v == "no" || v == "null" || v == "~" || v == "[]" || v == "off"
}
function warn(m) { printf "warn\037%s\n", m }

# Split a flow list "[a, b]" (or, when split_commas, a plain "a, b") into items.
function items(v, out, split_commas,    n, i, parts, k) {
	v = trim(v)
	k = 0
	if (v ~ /^\[.*\]$/) {
		v = substr(v, 2, length(v) - 2)
		split_commas = 1
	}
	if (split_commas) {
		n = split(v, parts, ",")
		for (i = 1; i <= n; i++)
			if (unquote(parts[i]) != "") out[++k] = unquote(parts[i])
	} else if (unquote(v) != "") {
		out[++k] = unquote(v)
	}
	return k
}

function start_item() {
	in_item = 1
	uname = ""; usudo = "no"; ushell = ""; uhome = ""; ugroups = ""; nkeys = 0; cur = ""
}
function flush_item(    i) {
	if (!in_item) return
	in_item = 0
	if (uname == "") {
		if (nkeys > 0 || ugroups != "") warn("users entry without name: ignored")
		return
	}
	printf "user\037%s\037%s\037%s\037%s\037%s\n", uname, usudo, ushell, uhome, ugroups
	for (i = 1; i <= nkeys; i++) printf "key\037%s\037%s\n", uname, ukeys[i]
}
function add_group(g) { ugroups = (ugroups == "" ? g : ugroups "," g) }
function item_kv(k, v,    n, i, arr) {
	cur = ""
	if (v == "" || v == "|" || v == ">") {
		if (v != "") warn("multi-line strings are not supported (" k ")")
		cur = k # a block list may follow
		return
	}
	if (k == "name") uname = unquote(v)
	else if (k == "sudo") usudo = is_false(v) ? "no" : "yes"
	else if (k == "shell") ushell = unquote(v)
	else if (k == "homedir") uhome = unquote(v)
	else if (k == "groups") { n = items(v, arr, 1); for (i = 1; i <= n; i++) add_group(arr[i]) }
	else if (k == "ssh_authorized_keys") { n = items(v, arr, 0); for (i = 1; i <= n; i++) ukeys[++nkeys] = arr[i] }
	else if (k == "gecos" || k == "lock_passwd" || k == "primary_group" || k == "no_create_home" || k == "system") { }
	else warn("users: key '" k "' is not supported, ignored")
}
function item_list(v) {
	v = unquote(v)
	if (cur == "ssh_authorized_keys") ukeys[++nkeys] = v
	else if (cur == "groups") add_group(v)
	else if (cur == "sudo") { if (!is_false(v)) usudo = "yes" }
}

BEGIN { top = ""; in_item = 0; item_ind = -1 }

{ sub(/\r$/, "") }

NR == 1 && doc == "user" && $0 !~ /^#cloud-config[ \t]*$/ {
	warn("user-data does not start with #cloud-config: ignored")
	exit 0
}

/^[ \t]*#/ || /^[ \t]*$/ || /^---[ \t]*$/ { next }

{
	ind = indent_of($0)
	line = trim($0)
	# a top-level key ends whatever block was open
	if (ind == 0 && line !~ /^- /) {
		flush_item()
		top = key_of(line)
		v = val_of(line)
		item_ind = -1
		if (top == "hostname" || top == "fqdn" || (doc == "meta" && top == "local-hostname")) {
			if (unquote(v) != "") printf "hostname\037%s\n", unquote(v)
		} else if (top == "ssh_authorized_keys" || (doc == "meta" && top == "public-keys")) {
			n = items(v, arr, 0)
			for (i = 1; i <= n; i++) printf "key\037root\037%s\n", arr[i]
		} else if (top == "users" && v != "" && v !~ /^\[ *(default)? *\]$/) {
			warn("users: only block lists are supported")
		}
		next
	}
	if (top == "ssh_authorized_keys" || (doc == "meta" && top == "public-keys")) {
		if (line ~ /^- /) printf "key\037root\037%s\n", unquote(substr(line, 3))
		next
	}
	if (top != "users") next

	if (line ~ /^- / && (item_ind < 0 || ind <= item_ind)) {
		# a new entry of the users list
		flush_item()
		item_ind = ind
		rest = trim(substr(line, 3))
		if (rest == "default") next
		if (rest ~ /^\{/) { warn("users: flow mappings are not supported"); next }
		start_item()
		if (index(rest, ":") > 0) item_kv(key_of(rest), val_of(rest))
		next
	}
	if (!in_item) next
	if (line ~ /^- /) { item_list(substr(line, 3)); next }
	if (line == "-") next
	if (index(line, ":") > 0) item_kv(key_of(line), val_of(line))
}

END { flush_item() }
