//! `kiln group create|list|show|delete` and `kiln account show`, shaped like `az group` and
//! `az account`.

use super::output::EXIT_OK;
use super::res::{self, Out};
use serde_json::json;

/// `kiln group …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a resource group (idempotent for the same location).
    Create {
        /// Name.
        #[arg(short = 'n', long = "name", visible_alias = "resource-group")]
        name: String,
        /// Location (region).
        #[arg(short = 'l', long)]
        location: String,
        /// Tags, KEY=VALUE.
        #[arg(long, num_args = 0..)]
        tags: Vec<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: Out,
    },
    /// List resource groups.
    List {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: Out,
    },
    /// Show a resource group.
    Show {
        /// Name.
        #[arg(short = 'n', long = "name", visible_alias = "resource-group")]
        name: String,
    },
    /// Delete an empty resource group.
    Delete {
        /// Name.
        #[arg(short = 'n', long = "name", visible_alias = "resource-group")]
        name: String,
        /// Do not prompt (kiln never prompts; accepted for az compatibility).
        #[arg(short = 'y', long)]
        yes: bool,
    },
}

/// Runs `kiln group …`.
pub fn run(cmd: Command) -> u8 {
    let store = match res::open() {
        Ok(s) => s,
        Err(c) => return c,
    };
    let sub = match res::subscription(&store) {
        Ok(s) => s,
        Err(c) => return c,
    };
    match cmd {
        Command::Create {
            name,
            location,
            tags,
            output,
        } => {
            let tags = match res::tags(&tags) {
                Ok(t) => t,
                Err(c) => return c,
            };
            match store.create_group(&sub, &name, &location, &tags, None) {
                Ok(g) => {
                    match output {
                        Out::Json => res::print(&g.to_json()),
                        Out::Table => {
                            res::table(&["Name", "Location"], &[vec![g.name, g.location]])
                        }
                    }
                    EXIT_OK
                }
                Err(e) => res::fail(&e),
            }
        }
        Command::List { output } => match store.groups(&sub) {
            Ok(gs) => {
                match output {
                    Out::Json => {
                        res::print(&json!(gs.iter().map(|g| g.to_json()).collect::<Vec<_>>()))
                    }
                    Out::Table => res::table(
                        &["Name", "Location", "ManagedBy"],
                        &gs.iter()
                            .map(|g| {
                                vec![
                                    g.name.clone(),
                                    g.location.clone(),
                                    g.managed_by.clone().unwrap_or_default(),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    ),
                }
                EXIT_OK
            }
            Err(e) => res::fail(&e),
        },
        Command::Show { name } => match store.require_group(&sub, &name) {
            Ok(g) => {
                res::print(&g.to_json());
                EXIT_OK
            }
            Err(e) => res::fail(&e),
        },
        Command::Delete { name, yes: _ } => match store.delete_group(&sub, &name) {
            Ok(()) => EXIT_OK,
            Err(e) => res::fail(&e),
        },
    }
}

/// `kiln account show`.
pub fn account_show() -> u8 {
    let store = match res::open() {
        Ok(s) => s,
        Err(c) => return c,
    };
    match store.subscription() {
        Ok((sub, from)) => {
            res::print(&json!({
                "environmentName": "kiln",
                "id": sub,
                "isDefault": true,
                "name": "kiln local subscription",
                "state": "Enabled",
                "tenantId": "00000000-0000-0000-0000-000000000000",
                "user": {"name": std::env::var("USER").unwrap_or_default(), "type": "user"},
                "kilnHome": store.home(),
                "subscriptionSource": from,
            }));
            EXIT_OK
        }
        Err(e) => res::fail(&e),
    }
}
