/*
 * kiln tiny guest: a minimal setuid-root `sudo`.
 *
 * Busybox has no sudo and a shell script cannot be setuid, so the tiny image gets this
 * small static binary (built by `cargo xtask images` with the host's `cc -static`).
 *
 * Policy (the equivalent of "%sudo ALL=(ALL) NOPASSWD:ALL" and "%wheel ..."): the
 * caller may run any command as any user, without a password, if it is root or a member
 * of the group "sudo" or "wheel" in /etc/group (primary or supplementary). Everyone else
 * is refused. There is no sudoers file and passwords are never asked for.
 *
 * Options understood: -u USER, -g GROUP, -E (keep the environment), -H (HOME of the
 * target user, the default anyway), -i (login shell), -s (shell), -n (non-interactive:
 * nothing to do), -S (read the password from stdin: nothing is read, as with NOPASSWD),
 * -k/-K/-v (no-ops), -l (prints the policy), -V, -h, and "--". NAME=VALUE words before
 * the command are added to its environment. PATH is always set to the secure_path of
 * Debian's sudoers.
 *
 * The user and group databases are read directly from /etc/passwd and /etc/group (no
 * NSS in a static binary).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SECURE_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define MAX_GROUPS 256

struct account {
	char name[64];
	uid_t uid;
	gid_t gid;
	char home[256];
	char shell[256];
};

static void die(const char *msg, const char *arg)
{
	fprintf(stderr, "sudo: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
	exit(1);
}

/* Split a passwd/group line in place on ':' into at most n fields. */
static int split_fields(char *line, char **f, int n)
{
	int i = 0;
	line[strcspn(line, "\n")] = 0;
	f[i++] = line;
	for (char *p = line; *p && i < n; p++)
		if (*p == ':') {
			*p = 0;
			f[i++] = p + 1;
		}
	return i;
}

/* Look up a user by name (name != NULL) or by uid. */
static int find_account(const char *name, uid_t uid, struct account *a)
{
	FILE *f = fopen("/etc/passwd", "r");
	char line[1024], *fl[7];
	int found = 0;
	if (!f)
		die("cannot read /etc/passwd", NULL);
	while (!found && fgets(line, sizeof line, f)) {
		if (split_fields(line, fl, 7) < 7)
			continue;
		uid_t u = (uid_t)strtoul(fl[2], NULL, 10);
		if (name ? strcmp(fl[0], name) == 0 : u == uid) {
			snprintf(a->name, sizeof a->name, "%s", fl[0]);
			a->uid = u;
			a->gid = (gid_t)strtoul(fl[3], NULL, 10);
			snprintf(a->home, sizeof a->home, "%s", fl[5][0] ? fl[5] : "/");
			snprintf(a->shell, sizeof a->shell, "%s", fl[6][0] ? fl[6] : "/bin/sh");
			found = 1;
		}
	}
	fclose(f);
	/* "-u #1000" names a uid directly */
	if (!found && name && name[0] == '#') {
		a->uid = (uid_t)strtoul(name + 1, NULL, 10);
		a->gid = a->uid;
		snprintf(a->name, sizeof a->name, "%s", name + 1);
		snprintf(a->home, sizeof a->home, "/");
		snprintf(a->shell, sizeof a->shell, "/bin/sh");
		found = 1;
	}
	return found;
}

static int member_of(const char *members, const char *user)
{
	size_t n = strlen(user);
	for (const char *p = members; *p;) {
		const char *e = strchr(p, ',');
		size_t len = e ? (size_t)(e - p) : strlen(p);
		if (len == n && strncmp(p, user, n) == 0)
			return 1;
		if (!e)
			break;
		p = e + 1;
	}
	return 0;
}

/* Is `a` allowed to use sudo: in group sudo or wheel (by primary gid or membership)? */
static int allowed(const struct account *a)
{
	FILE *f = fopen("/etc/group", "r");
	char line[4096], *fl[4];
	int ok = 0;
	if (a->uid == 0)
		return 1;
	if (!f)
		return 0;
	while (!ok && fgets(line, sizeof line, f)) {
		if (split_fields(line, fl, 4) < 4)
			continue;
		if (strcmp(fl[0], "sudo") && strcmp(fl[0], "wheel"))
			continue;
		if ((gid_t)strtoul(fl[2], NULL, 10) == a->gid || member_of(fl[3], a->name))
			ok = 1;
	}
	fclose(f);
	return ok;
}

/* Supplementary groups of the target user, from /etc/group. */
static int groups_of(const struct account *a, gid_t *out)
{
	FILE *f = fopen("/etc/group", "r");
	char line[4096], *fl[4];
	int n = 0;
	out[n++] = a->gid;
	if (!f)
		return n;
	while (n < MAX_GROUPS && fgets(line, sizeof line, f)) {
		if (split_fields(line, fl, 4) < 4)
			continue;
		gid_t g = (gid_t)strtoul(fl[2], NULL, 10);
		if (g != a->gid && member_of(fl[3], a->name))
			out[n++] = g;
	}
	fclose(f);
	return n;
}

static gid_t group_by_name(const char *name)
{
	FILE *f = fopen("/etc/group", "r");
	char line[4096], *fl[4];
	if (name[0] == '#')
		return (gid_t)strtoul(name + 1, NULL, 10);
	if (f) {
		while (fgets(line, sizeof line, f)) {
			if (split_fields(line, fl, 4) >= 3 && strcmp(fl[0], name) == 0) {
				fclose(f);
				return (gid_t)strtoul(fl[2], NULL, 10);
			}
		}
		fclose(f);
	}
	die("unknown group", name);
	return 0;
}

static void usage(int code)
{
	fprintf(code ? stderr : stdout,
		"usage: sudo [-EHinSs] [-u user] [-g group] [--] [NAME=VALUE...] command [args...]\n"
		"       sudo -i | -s        (shell)\n"
		"kiln tiny guest sudo: members of group sudo or wheel may run anything, no password.\n");
	exit(code);
}

static const char *keep_env[] = {"TERM", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ",
				 "COLORTERM", "DISPLAY", NULL};

int main(int argc, char **argv)
{
	struct account caller, target;
	const char *user = "root", *group = NULL;
	int keep = 0, login = 0, shell = 0, i;

	if (!find_account(NULL, getuid(), &caller))
		die("you do not exist in the passwd database", NULL);

	for (i = 1; i < argc; i++) {
		char *a = argv[i];
		if (a[0] != '-' || !a[1])
			break;
		if (!strcmp(a, "--")) {
			i++;
			break;
		}
		if (!strncmp(a, "--", 2)) {
			if (!strcmp(a, "--preserve-env"))
				keep = 1;
			else if (!strncmp(a, "--user=", 7))
				user = a + 7;
			else if (!strcmp(a, "--login"))
				login = 1;
			else if (!strcmp(a, "--shell"))
				shell = 1;
			else if (!strcmp(a, "--non-interactive") || !strcmp(a, "--stdin"))
				;
			else if (!strcmp(a, "--help"))
				usage(0);
			else
				die("unsupported option", a);
			continue;
		}
		for (char *p = a + 1; *p; p++) {
			switch (*p) {
			case 'E': keep = 1; break;
			case 'H': case 'n': case 'S': case 'k': case 'K': case 'A': case 'b': break;
			case 'i': login = 1; break;
			case 's': shell = 1; break;
			case 'v': return allowed(&caller) ? 0 : 1;
			case 'l':
				if (!allowed(&caller))
					return 1;
				printf("User %s may run the following commands:\n    (ALL : ALL) NOPASSWD: ALL\n",
				       caller.name);
				return 0;
			case 'V': printf("kiln tiny sudo 1.0\n"); return 0;
			case 'h': usage(0); break;
			case 'u': case 'g': case 'p': case 'C': case 'D': case 'r': case 't': case 'U': {
				char opt = *p;
				const char *val = p[1] ? p + 1 : (i + 1 < argc ? argv[++i] : NULL);
				if (!val)
					die("option requires an argument", a);
				if (opt == 'u')
					user = val;
				else if (opt == 'g')
					group = val;
				p = (char *)"x"; /* ends this word: the rest was the value */
				break;
			}
			default: {
				char o[3] = {'-', *p, 0};
				die("unsupported option", o);
			}
			}
		}
	}

	if (!allowed(&caller)) {
		fprintf(stderr, "sudo: %s is not in the sudoers file (groups sudo/wheel).\n", caller.name);
		return 1;
	}
	if (!find_account(user, 0, &target))
		die("unknown user", user);

	gid_t groups[MAX_GROUPS];
	int ngroups = groups_of(&target, groups);
	gid_t gid = group ? group_by_name(group) : target.gid;

	/* Environment: keep all with -E, else a small safe set; then the sudo variables. */
	if (!keep) {
		char *saved[16];
		int n = 0;
		for (const char **k = keep_env; *k && n < 15; k++) {
			const char *v = getenv(*k);
			if (v) {
				size_t len = strlen(*k) + strlen(v) + 2;
				saved[n] = malloc(len);
				snprintf(saved[n++], len, "%s=%s", *k, v);
			}
		}
		clearenv();
		for (int j = 0; j < n; j++)
			putenv(saved[j]);
	}
	char buf[32];
	setenv("PATH", SECURE_PATH, 1);
	setenv("HOME", target.home, 1);
	setenv("USER", target.name, 1);
	setenv("LOGNAME", target.name, 1);
	setenv("SHELL", target.shell, 1);
	setenv("SUDO_USER", caller.name, 1);
	snprintf(buf, sizeof buf, "%u", (unsigned)caller.uid);
	setenv("SUDO_UID", buf, 1);
	snprintf(buf, sizeof buf, "%u", (unsigned)caller.gid);
	setenv("SUDO_GID", buf, 1);

	/* NAME=VALUE words before the command */
	while (i < argc && strchr(argv[i], '=') && argv[i][0] != '=' && argv[i][0] != '/') {
		char *eq = strchr(argv[i], '=');
		*eq = 0;
		setenv(argv[i], eq + 1, 1);
		*eq = '=';
		i++;
	}

	if (i >= argc && !login && !shell)
		usage(1);

	/* Build the command line. */
	char **cmd;
	if (login || shell) {
		const char *sh = login ? target.shell : (getenv("SHELL") ? getenv("SHELL") : "/bin/sh");
		cmd = calloc((size_t)argc + 4, sizeof *cmd);
		int n = 0;
		cmd[n++] = login ? "-sh" : (char *)sh;
		if (i < argc) {
			/* like sudo: the words are joined into one command for the shell's -c */
			size_t len = 1;
			for (int j = i; j < argc; j++)
				len += strlen(argv[j]) + 1;
			char *joined = calloc(len, 1);
			for (int j = i; j < argc; j++) {
				strcat(joined, argv[j]);
				if (j + 1 < argc)
					strcat(joined, " ");
			}
			cmd[n++] = "-c";
			cmd[n++] = joined;
		}
		cmd[n] = NULL;
		if (login && chdir(target.home) != 0)
			(void)chdir("/");
		if (setgroups((size_t)ngroups, groups) || setgid(gid) || setuid(target.uid))
			die("cannot change identity", strerror(errno));
		execv(sh, cmd);
		die("cannot run the shell", sh);
	}

	cmd = argv + i;
	{
		size_t len = 1;
		for (int j = i; j < argc; j++)
			len += strlen(argv[j]) + 1;
		char *joined = calloc(len, 1);
		for (int j = i; j < argc; j++) {
			strcat(joined, argv[j]);
			if (j + 1 < argc)
				strcat(joined, " ");
		}
		setenv("SUDO_COMMAND", joined, 1);
	}
	if (setgroups((size_t)ngroups, groups) || setgid(gid) || setuid(target.uid))
		die("cannot change identity", strerror(errno));
	execvp(cmd[0], cmd);
	fprintf(stderr, "sudo: %s: %s\n", cmd[0], errno == ENOENT ? "command not found" : strerror(errno));
	return errno == ENOENT ? 127 : 126;
}
