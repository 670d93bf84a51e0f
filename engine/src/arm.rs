//! TEMPORARY interface placeholder until the ARM evaluator lands (not committed).
#![allow(missing_docs)]
use crate::json::{Node, Span};
#[derive(Debug, Clone)]
pub struct ArmContext { pub subscription_id: String, pub resource_group: String, pub resource_group_location: String, pub deployment_name: String, pub tenant_id: String }
pub struct ArmDiag { pub code: &'static str, pub span: Span, pub message: String, pub fix: String }
pub struct EvaluatedResource { pub node: Node, pub unresolved: Vec<Span> }
pub fn is_deployment_template(root: &Node) -> bool { root.get("resources").is_some() && root.get("$schema").is_some() }
pub fn parse_parameters_file(_root: &Node) -> Result<Vec<(String, serde_json::Value)>, ArmDiag> { Ok(vec![]) }
pub fn evaluate_image_templates(_root: &Node, _p: &[(String, serde_json::Value)], _c: &ArmContext) -> (Vec<EvaluatedResource>, Vec<ArmDiag>) { (vec![], vec![]) }
